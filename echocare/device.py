"""Which compute device a site uses: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

:func:`resolve_device` turns a site's request into a :class:`ComputeDevice`: the torch device
string, a device *class* for reports (``"cuda:H200"``, ``"cpu"``), the autocast dtype for
feature extraction (bf16 where the GPU supports it, else fp16; none on the CPU) and one
human-readable line saying what was chosen and why. ``auto`` falls back to the CPU and says so;
an explicit ``cuda``/``cuda:N`` without a usable GPU raises :class:`DeviceError` with the reason,
so a site fails before any round starts rather than during one.

:func:`fit_batch_size` sizes a batch from the GPU's free memory: it measures the peak memory of
one small probe batch and scales it to what is free (minus a headroom). :func:`cosine_rows` and
:func:`autocast_agrees` compare reduced-precision features with fp32 ones, so a site can state
(and check) how close its cached features are to fp32.

torch is imported inside the functions: importing this module is free, and everything here is
unit-tested on CPU-only machines with ``torch.cuda`` monkeypatched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

log = logging.getLogger(__name__)

#: What a site may ask for.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
#: Feature precision choices: ``auto`` = bf16 (or fp16) autocast on a GPU, fp32 on the CPU.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
#: Reduced-precision features must agree with fp32 at least this well (cosine, every image).
AUTOCAST_MIN_COSINE = 0.995

_REQUEST = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


class DeviceError(RuntimeError):
    """The requested device cannot be used (``str(e)`` says which and why)."""


@dataclass(frozen=True)
class ComputeDevice:
    """A resolved device. ``autocast`` is ``"bfloat16"``, ``"float16"`` or None (fp32)."""

    requested: str
    torch_device: str  # "cpu" or "cuda:N"
    device_class: str  # "cpu" or "cuda:<GPU model>", e.g. "cuda:H200" (a capability in reports)
    autocast: str | None
    message: str
    fell_back: bool = False  # "auto" found no usable GPU
    memory_bytes: int = 0  # total GPU memory (0 on the CPU)

    @property
    def is_cuda(self) -> bool:
        return self.torch_device.startswith("cuda")

    @property
    def index(self) -> int | None:
        return int(self.torch_device.split(":")[1]) if self.is_cuda else None

    def autocast_dtype(self) -> "torch.dtype | None":
        import torch

        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.autocast or "")

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this device's dtype, or a no-op context in fp32."""
        if self.autocast is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type="cuda" if self.is_cuda else "cpu", dtype=self.autocast_dtype())

    def to_dict(self) -> dict:
        return asdict(self)


def parse_request(request: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)``; ValueError naming the valid choices otherwise."""
    m = _REQUEST.match(str(request).strip().lower())
    if not m or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"device {request!r}: expected one of {', '.join(DEVICE_CHOICES)}")
    return m.group(1), (int(m.group(2)) if m.group(2) is not None else None)


def device_class_name(gpu_name: str) -> str:
    """``"NVIDIA H200"`` -> ``"cuda:H200"``; ``"NVIDIA GeForce RTX 4090"`` -> ``"cuda:GeForce-RTX-4090"``."""
    name = re.sub(r"^(NVIDIA|Tesla)\s+", "", gpu_name.strip(), flags=re.IGNORECASE)
    name = re.sub(r"^(Tesla)\s+", "", name, flags=re.IGNORECASE)
    return "cuda:" + (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "unknown")


def _cuda_unusable_reason() -> str | None:
    """None when at least one CUDA GPU is usable, else why not (one line)."""
    import torch

    if getattr(torch.version, "cuda", None) is None and not torch.cuda.is_available():
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            return "no NVIDIA GPU is visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "") + \
                " or its driver cannot be used"
    except Exception as e:  # a broken driver raises at initialisation
        return f"CUDA cannot initialise ({type(e).__name__}: {e})"
    return None


def _precision(precision: str, major: int | None) -> str | None:
    """The autocast dtype for ``precision`` on a GPU of compute capability ``major`` (None: CPU)."""
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISION_CHOICES)}")
    if major is None or precision == "fp32":
        return None
    if precision == "auto":
        return "bfloat16" if major >= 8 else ("float16" if major >= 7 else None)
    if precision == "bf16" and major < 8:
        raise DeviceError(f"bf16 needs a GPU of compute capability 8.0 or newer (Ampere+); this one is {major}.x")
    return "bfloat16" if precision == "bf16" else "float16"


def resolve_device(request: str = "auto", precision: str = "auto") -> ComputeDevice:
    """The device for ``request`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``).

    Raises ValueError for a malformed request and :class:`DeviceError` when an explicit CUDA
    device cannot be used (no CUDA build, no GPU visible, index out of range, broken driver).
    ``precision``: ``auto`` (bf16 on compute capability >= 8, fp16 on 7.x, fp32 on the CPU),
    ``fp32``, ``bf16`` or ``fp16``. On an explicit ``cpu`` only ``bf16`` enables autocast (CPU bf16
    autocast, used by ``echofleet site check --device cpu --precision bf16`` to exercise the
    precision probe without a GPU); ``fp16`` there is a :class:`DeviceError`.
    """
    kind, index = parse_request(request)
    if kind == "cpu":
        _precision(precision, None)  # validates the name
        if precision == "bf16":  # asked for explicitly: CPU bf16 autocast (e.g. to run the precision probe)
            return ComputeDevice(request, "cpu", "cpu", "bfloat16", "device cpu: as configured, features with bfloat16 autocast")
        if precision == "fp16":
            raise DeviceError("fp16 autocast needs a GPU; on the CPU use fp32 (or bf16)")
        return ComputeDevice(request, "cpu", "cpu", None, "device cpu: as configured (fp32)")
    import torch

    reason = _cuda_unusable_reason()
    if reason is not None:
        if kind == "auto":
            return ComputeDevice(request, "cpu", "cpu", None, f"device auto: {reason}; using the CPU (fp32)", fell_back=True)
        raise DeviceError(f"device {request!r} requested but {reason}; use --device cpu (or auto) on this machine")
    count = torch.cuda.device_count()
    index = 0 if index is None else index
    if index >= count:
        raise DeviceError(f"device {request!r} requested but only {count} GPU(s) are visible (cuda:0..cuda:{count - 1})")
    try:
        name = torch.cuda.get_device_name(index)
        major, minor = torch.cuda.get_device_capability(index)
        total = int(torch.cuda.get_device_properties(index).total_memory)
    except Exception as e:
        if kind == "auto":
            return ComputeDevice(request, "cpu", "cpu", None,
                                 f"device auto: GPU {index} cannot be queried ({type(e).__name__}: {e}); using the CPU (fp32)",
                                 fell_back=True)
        raise DeviceError(f"device {request!r}: GPU {index} cannot be queried ({type(e).__name__}: {e})") from None
    dtype = _precision(precision, major)
    label = device_class_name(name)
    msg = (f"device {request}: cuda:{index} = {name} (compute {major}.{minor}, {total / 2**30:.0f} GiB), "
           f"features with {dtype or 'fp32'}" + (" autocast" if dtype else ""))
    return ComputeDevice(request, f"cuda:{index}", label, dtype, msg, memory_bytes=total)


# --------------------------------------------------------------------------------------------
# Batch size from free memory


def batch_size_from_memory(free_bytes: int, per_item_bytes: float, fixed_bytes: int = 0, headroom: float = 0.8,
                           max_batch: int = 1024, min_batch: int = 1) -> int:
    """The largest power of two ``n <= max_batch`` with ``fixed + n * per_item <= headroom * free``.

    Raises :class:`DeviceError` when not even ``min_batch`` items fit.
    """
    if per_item_bytes <= 0:
        return max_batch
    usable = headroom * free_bytes - fixed_bytes
    fits = int(usable // per_item_bytes)
    if fits < min_batch:
        raise DeviceError(
            f"the GPU has {free_bytes / 2**30:.2f} GiB free; {min_batch} item(s) need about "
            f"{(fixed_bytes + min_batch * per_item_bytes) / headroom / 2**30:.2f} GiB (with {1 - headroom:.0%} headroom)"
        )
    n = 1
    while n * 2 <= min(fits, max_batch):
        n *= 2
    return max(n, min_batch)


def fit_batch_size(device: ComputeDevice, step: Callable[[int], Any], probe: int = 4, max_batch: int = 1024,
                   headroom: float = 0.8, cpu_batch: int = 16) -> int:
    """A batch size for ``step(batch_size)`` (one forward of that many items) on ``device``.

    On the CPU: ``cpu_batch``. On a GPU: runs ``step(probe)`` once, takes its peak memory above
    what was allocated before as the cost of ``probe`` items, and fits that into the memory free
    now (memory the caching allocator holds but does not use counts as free).
    """
    if not device.is_cuda:
        return cpu_batch
    import torch

    idx = device.index
    torch.cuda.synchronize(idx)
    base = torch.cuda.memory_allocated(idx)
    torch.cuda.reset_peak_memory_stats(idx)
    step(probe)
    torch.cuda.synchronize(idx)
    per_item = max(0, torch.cuda.max_memory_allocated(idx) - base) / probe
    free, _total = torch.cuda.mem_get_info(idx)
    free += max(0, torch.cuda.memory_reserved(idx) - torch.cuda.memory_allocated(idx))
    n = batch_size_from_memory(free, per_item, headroom=headroom, max_batch=max_batch)
    log.info("batch size %d on %s (%.1f MiB per item, %.1f GiB free)", n, device.device_class, per_item / 2**20, free / 2**30)
    return n


# --------------------------------------------------------------------------------------------
# Running a frozen encoder on the device, and checking reduced precision against fp32


def batches(n: int, batch_size: int) -> Iterator[slice]:
    """Slices covering ``range(n)`` in steps of ``batch_size``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def run_frozen(module: "torch.nn.Module", x: np.ndarray, device: ComputeDevice, batch_size: int,
               fn: Callable[["torch.nn.Module", "torch.Tensor"], "torch.Tensor"]) -> np.ndarray:
    """``fn(module, batch)`` over ``x`` (float32 N x ...) on ``device`` in inference mode with the
    device's autocast; float32 numpy out. ``module`` must already be on the device."""
    import torch

    out = []
    with torch.inference_mode():
        for sl in batches(len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[sl])).to(device.torch_device, non_blocking=True)
            with device.autocast_context():
                y = fn(module, xb)
            out.append(y.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64; 1.0 for two zero rows)."""
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    if a.shape != b.shape:
        raise ValueError(f"cannot compare features of shapes {a.shape} and {b.shape}")
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / (na * nb))
    return np.nan_to_num(cos, nan=0.0)


def autocast_agrees(fp32: np.ndarray, reduced: np.ndarray, min_cosine: float = AUTOCAST_MIN_COSINE) -> tuple[bool, float, float]:
    """(every image's cosine >= ``min_cosine``, the minimum cosine, the mean cosine)."""
    cos = cosine_rows(fp32, reduced)
    if cos.size == 0:
        return True, 1.0, 1.0
    return bool(cos.min() >= min_cosine), float(cos.min()), float(cos.mean())
