"""The task-model checkpoint: the hand-off between federation (fed/, server/) and edge (edge/).

A task model is a directory with two files::

    model.json         TaskModelSpec as JSON (+ format tag and the sha256 of head.safetensors)
    head.safetensors   the head's state dict (the only trained weights)

The encoder is not copied: the spec names its config and either a checkpoint (path as given,
pinned by sha256) or the seed of its random init. :func:`load_task_model` rebuilds the encoder,
verifies the checkpoint's sha256, rebuilds the head from ``spec.head`` and loads its weights
strictly.

This module imports no torch at import time: :func:`read_task_model_spec` works on a scanner
with only the torch-free edge runtime. ``TaskModel`` (an ``nn.Module``) is loaded on first
access (``from echocare.models.task_model import TaskModel``).

Saving writes both files to temporaries and ``os.replace`` s them in (head first, then
``model.json``); a crash mid-write leaves the previous files. ``model.json`` records the head
file's sha256, so the one-instant window between the two renames can never be loaded silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from echocare.preprocess import PreprocessSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from echocare.models.task_net import TaskModel

log = logging.getLogger(__name__)

SPEC_FILE = "model.json"
HEAD_FILE = "head.safetensors"
FORMAT = "echofleet-task-model"
FORMAT_VERSION = 1
TASKS = ("classify", "segment", "hc")  # kept in sync with echocare.models.heads.TASKS (torch-free copy)


@dataclass
class TaskModelSpec:
    """Everything needed to rebuild a task model, and its model card (``provenance``).

    - ``encoder_config``: ``"echocare"`` | ``"echocare-small"`` | ``"echocare-tiny"``.
    - ``encoder_checkpoint``: path (as given; ``hf://`` allowed) or None for the seeded random init.
    - ``encoder_sha256``: pins the checkpoint (filled in by :func:`save_task_model` if None).
    - ``labels``: class names; ``len(labels)`` is the head's number of outputs
      (segment/hc include the background, e.g. ``["background", "lesion"]``).
    - ``head``: :func:`echocare.models.heads.build_head` kwargs (``head_kwargs_of(head)``).
    - ``preprocess``: :meth:`echocare.preprocess.PreprocessSpec.to_dict`.
    - ``provenance``: free JSON: sites, rounds, epsilon per site, metrics.
    """

    encoder_config: str
    encoder_checkpoint: str | None
    encoder_sha256: str | None
    encoder_seed: int = 0
    task: str = "classify"
    labels: list[str] = field(default_factory=list)
    head: dict = field(default_factory=dict)
    preprocess: dict = field(default_factory=lambda: PreprocessSpec().to_dict())
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")

    def preprocess_spec(self) -> PreprocessSpec:
        return PreprocessSpec.from_dict(self.preprocess)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "TaskModelSpec":
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("encoder_config", "encoder_checkpoint", "encoder_sha256") if k not in d]
        if missing:
            raise ValueError(f"{source}: task model spec lacks {', '.join(missing)}")
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid task model spec: {e}") from e


def _read_json(directory: str | Path) -> tuple[TaskModelSpec, dict]:
    path = Path(directory) / SPEC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no task model here (missing {SPEC_FILE})")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an {FORMAT} file (format tag {doc.get('format') if isinstance(doc, dict) else None!r})")
    if int(doc.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {doc['format_version']} is newer than this echofleet reads ({FORMAT_VERSION})")
    return TaskModelSpec.from_dict(doc, source=str(path)), doc


def read_task_model_spec(directory: str | Path) -> TaskModelSpec:
    """The spec in ``directory/model.json`` (JSON only; no torch needed)."""
    return _read_json(directory)[0]


def _atomic_write_bytes(target: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``target``; return the temporary (not yet renamed)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _strip_opacus_prefix(state: dict[str, Any]) -> dict[str, Any]:
    prefix = "_module."
    if state and all(k.startswith(prefix) for k in state):
        log.warning("head state: stripped the Opacus wrapper prefix %r from all %d keys", prefix, len(state))
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _head_kwargs(spec: TaskModelSpec) -> dict:
    kw = dict(spec.head)
    if "num_classes" in kw:  # tolerated, but it must agree with the labels
        n = int(kw.pop("num_classes"))
        if n != len(spec.labels):
            raise ValueError(f"spec.head num_classes={n} disagrees with {len(spec.labels)} labels {spec.labels}")
    return kw


def _build_head(spec: TaskModelSpec):
    from echocare.models.heads import build_head

    return build_head(spec.task, spec.encoder_config, len(spec.labels), **_head_kwargs(spec))


def _check_head_state(expected: dict, state: dict, source: str) -> None:
    """Raise CheckpointError unless ``state`` has exactly the keys and shapes of ``expected``."""
    from echocare.models.encoder import CheckpointError

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source}: head weights do not match the head built from the spec "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {mismatched[:3]})"
        )


def save_task_model(directory: str | Path, spec: TaskModelSpec, head_state: dict[str, "torch.Tensor"]) -> None:
    """Write ``directory/model.json`` and ``directory/head.safetensors`` (each via temp + ``os.replace``).

    ``head_state`` is checked against the head that ``spec`` describes (strictly) before anything is
    written; an Opacus ``_module.`` prefix is stripped (logged). If the spec names an encoder
    checkpoint without a sha256, the file's sha256 is computed and recorded.
    """
    from safetensors.torch import save as st_save

    from echocare.models.encoder import get_config, resolve_checkpoint, sha256_file

    get_config(spec.encoder_config)  # unknown config -> ValueError before writing
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in _strip_opacus_prefix(head_state).items()}
    expected = _build_head(spec).state_dict()
    _check_head_state(expected, state, source=f"save_task_model({directory})")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}  # e.g. float64 aggregates -> float32
    if spec.encoder_checkpoint is not None and spec.encoder_sha256 is None:
        spec = replace(spec, encoder_sha256=sha256_file(resolve_checkpoint(spec.encoder_checkpoint)))

    head_bytes = st_save(state, metadata={"task": spec.task, "encoder_config": spec.encoder_config})
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **spec.to_dict(), "head_file": HEAD_FILE, "head_sha256": hashlib.sha256(head_bytes).hexdigest()}
    json_bytes = (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode()

    directory.mkdir(parents=True, exist_ok=True)
    tmp_head = _atomic_write_bytes(directory / HEAD_FILE, head_bytes)
    try:
        tmp_json = _atomic_write_bytes(directory / SPEC_FILE, json_bytes)
    except BaseException:
        tmp_head.unlink(missing_ok=True)
        raise
    os.replace(tmp_head, directory / HEAD_FILE)
    os.replace(tmp_json, directory / SPEC_FILE)


def _resolve_relative(checkpoint: str, directory: Path) -> str:
    """A relative checkpoint path that does not exist from the cwd is tried relative to the model dir."""
    if checkpoint.startswith("hf://") or Path(checkpoint).is_absolute() or Path(checkpoint).exists():
        return checkpoint
    beside = directory / checkpoint
    return str(beside) if beside.exists() else checkpoint


def load_task_model(
    directory: str | Path, map_location: str = "cpu", encoder_checkpoint: str | Path | None = None
) -> tuple["TaskModel", TaskModelSpec]:
    """Rebuild the task model in eval mode, and return it with its spec.

    The encoder comes from ``spec.encoder_checkpoint`` (or ``encoder_checkpoint``, to point at a
    local copy of the same file), whose sha256 must equal ``spec.encoder_sha256``
    (:class:`~echocare.models.encoder.CheckpointError` otherwise), or from the seeded random
    init. The head is rebuilt from ``spec.head`` and its weights are loaded strictly.
    """
    from safetensors.torch import load as st_load

    from echocare.models.encoder import CheckpointError, load_encoder
    from echocare.models.task_net import TaskModel

    directory = Path(directory)
    spec, doc = _read_json(directory)
    head_path = directory / str(doc.get("head_file", HEAD_FILE))
    try:
        head_bytes = head_path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{head_path}: cannot read head weights: {e}") from e
    want = doc.get("head_sha256")
    if want and hashlib.sha256(head_bytes).hexdigest() != want:
        raise CheckpointError(f"{head_path}: sha256 differs from the one recorded in {SPEC_FILE} (modified, or an interrupted save)")
    try:
        state = st_load(head_bytes)
    except Exception as e:
        raise CheckpointError(f"{head_path}: not a readable safetensors file: {e}") from e

    ckpt = encoder_checkpoint if encoder_checkpoint is not None else spec.encoder_checkpoint
    if ckpt is not None and spec.encoder_sha256 is None:
        log.warning("%s: the spec pins no encoder sha256; %s is loaded unverified", directory, ckpt)
    encoder, _ = load_encoder(
        spec.encoder_config,
        _resolve_relative(str(ckpt), directory) if ckpt is not None else None,
        seed=spec.encoder_seed,
        expected_sha256=spec.encoder_sha256 if ckpt is not None else None,
    )
    head = _build_head(spec)
    _check_head_state(head.state_dict(), state, source=str(head_path))
    head.load_state_dict(state, strict=True)
    model = TaskModel(encoder, head, spec.task).to(map_location).eval()
    return model, spec


def __getattr__(name: str) -> Any:
    """Lazy ``TaskModel`` (keeps this module torch-free until it is used)."""
    if name == "TaskModel":
        from echocare.models.task_net import TaskModel

        return TaskModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
