"""Device selection, dtype choice, the CPU fallback and batch sizing, all on CPU with torch.cuda monkeypatched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from echocare.device import (
    AUTOCAST_MIN_COSINE,
    ComputeDevice,
    DeviceError,
    autocast_agrees,
    batch_size_from_memory,
    cosine_rows,
    device_class_name,
    fit_batch_size,
    parse_request,
    resolve_device,
    run_frozen,
)

GiB = 2**30


class _Props:
    def __init__(self, total: int):
        self.total_memory = total


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture()
def fake_gpus(monkeypatch):
    """Two visible GPUs: an H200 (compute 9.0) and a Tesla T4 (compute 7.5)."""
    names = ["NVIDIA H200", "Tesla T4"]
    caps = [(9, 0), (7, 5)]
    totals = [141 * GiB, 16 * GiB]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: names[i])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: caps[i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: _Props(totals[i]))


def test_requests_are_parsed_or_refused_with_the_choices():
    assert parse_request("auto") == ("auto", None) and parse_request("CUDA:3") == ("cuda", 3)
    for bad in ("gpu", "cuda:x", "cpu:1", "auto:0", "cuda:-1", ""):
        with pytest.raises(ValueError, match="expected one of auto, cpu, cuda, cuda:N"):
            parse_request(bad)


def test_cpu_is_fp32_and_needs_no_gpu(no_gpu):
    d = resolve_device("cpu")
    assert (d.torch_device, d.device_class, d.autocast, d.fell_back) == ("cpu", "cpu", None, False)
    assert not d.is_cuda and d.index is None and d.autocast_dtype() is None


def test_cpu_bf16_autocast_only_when_asked_and_never_fp16(no_gpu):
    """``site check --device cpu --precision bf16`` exercises the autocast probe without a GPU."""
    assert resolve_device("cpu", precision="auto").autocast is None and resolve_device("cpu", "fp32").autocast is None
    d = resolve_device("cpu", precision="bf16")
    assert (d.torch_device, d.autocast) == ("cpu", "bfloat16") and d.autocast_dtype() is torch.bfloat16
    with pytest.raises(DeviceError, match="fp16 autocast needs a GPU"):
        resolve_device("cpu", precision="fp16")
    assert resolve_device("auto", precision="bf16").autocast is None  # the fallback stays fp32


def test_auto_without_a_gpu_falls_back_and_says_so(no_gpu):
    d = resolve_device("auto")
    assert d.torch_device == "cpu" and d.device_class == "cpu" and d.fell_back
    assert d.message.startswith("device auto: ") and "using the CPU" in d.message


def test_this_machine_resolves_without_monkeypatching():
    """The real torch here (CPU build in CI): auto never raises; explicit cuda raises exactly when no GPU."""
    d = resolve_device("auto")
    assert d.is_cuda == torch.cuda.is_available()
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' requested but"):
            resolve_device("cuda")


@pytest.mark.parametrize("request_", ["cuda", "cuda:0", "cuda:1"])
def test_explicit_cuda_without_a_gpu_fails_with_the_reason(no_gpu, request_):
    with pytest.raises(DeviceError) as err:
        resolve_device(request_)
    msg = str(err.value)
    assert f"device {request_!r} requested but" in msg and "use --device cpu" in msg


def test_no_cuda_build_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError, match=r"this PyTorch build \(.*\) has no CUDA support"):
        resolve_device("cuda")


def test_gpu_class_dtype_and_memory(fake_gpus):
    h200 = resolve_device("auto")
    assert (h200.torch_device, h200.device_class, h200.autocast) == ("cuda:0", "cuda:H200", "bfloat16")
    assert h200.is_cuda and h200.index == 0 and h200.memory_bytes == 141 * GiB and not h200.fell_back
    assert h200.autocast_dtype() is torch.bfloat16 and "NVIDIA H200" in h200.message and "bfloat16" in h200.message
    t4 = resolve_device("cuda:1")
    assert (t4.torch_device, t4.device_class, t4.autocast) == ("cuda:1", "cuda:T4", "float16")
    assert resolve_device("cuda", precision="fp32").autocast is None
    with pytest.raises(DeviceError, match="bf16 needs a GPU of compute capability 8.0"):
        resolve_device("cuda:1", precision="bf16")
    with pytest.raises(DeviceError, match=r"only 2 GPU\(s\) are visible"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="precision 'int8'"):
        resolve_device("cuda", precision="int8")


def test_a_gpu_that_cannot_be_queried(fake_gpus, monkeypatch):
    def broken(i=0):
        raise RuntimeError("CUDA error: unknown error")

    monkeypatch.setattr(torch.cuda, "get_device_name", broken)
    assert resolve_device("auto").fell_back
    with pytest.raises(DeviceError, match="GPU 0 cannot be queried"):
        resolve_device("cuda")


def test_device_class_names():
    assert device_class_name("NVIDIA H200") == "cuda:H200"
    assert device_class_name("NVIDIA GeForce RTX 4090") == "cuda:GeForce-RTX-4090"
    assert device_class_name("NVIDIA A100-SXM4-80GB") == "cuda:A100-SXM4-80GB"
    assert device_class_name("Tesla V100-PCIE-16GB") == "cuda:V100-PCIE-16GB"


def test_batch_size_from_memory():
    assert batch_size_from_memory(10 * GiB, 100 * 2**20) == 64  # 0.8 * 10 GiB / 100 MiB = 81 -> 64
    assert batch_size_from_memory(10 * GiB, 100 * 2**20, fixed_bytes=4 * GiB) == 32  # (8 - 4) GiB / 100 MiB = 40
    assert batch_size_from_memory(1000 * GiB, 1, max_batch=256) == 256
    assert batch_size_from_memory(GiB, 0) == 1024
    with pytest.raises(DeviceError, match=r"the GPU has 1.00 GiB free; 1 item\(s\) need about"):
        batch_size_from_memory(GiB, 2 * GiB)


def test_fit_batch_size_measures_a_probe_batch(fake_gpus, monkeypatch):
    """The probe's peak over the baseline, per item, fitted into free + cached-but-unused memory."""
    state = {"allocated": 2 * GiB, "peak": 0}
    calls = []

    def step(n):
        calls.append(n)
        state["peak"] = state["allocated"] + n * 300 * 2**20  # 300 MiB per item

    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=None: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=None: state["allocated"] + 6 * GiB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (44 * GiB, 141 * GiB))
    d = resolve_device("cuda")
    # (44 + 6) GiB free * 0.8 / 300 MiB = 136.5 -> 128 (without the cached 6 GiB: 120 -> 64)
    assert fit_batch_size(d, step, probe=4) == 128 and calls == [4]
    assert fit_batch_size(d, step, probe=4, max_batch=64) == 64
    assert fit_batch_size(resolve_device("cpu"), step, cpu_batch=12) == 12 and calls == [4, 4]  # the CPU runs no probe


def test_run_frozen_on_cpu_batches_and_returns_float32():
    lin = torch.nn.Linear(6, 3)
    x = np.random.default_rng(0).standard_normal((10, 6)).astype(np.float32)
    d = resolve_device("cpu")
    out = run_frozen(lin, x, d, batch_size=4, fn=lambda m, xb: m(xb))
    with torch.no_grad():
        assert out.dtype == np.float32 and np.allclose(out, lin(torch.from_numpy(x)).numpy(), atol=1e-6)
    # bf16 autocast on the CPU runs the same code path the GPU takes, and is close to fp32
    bf16 = ComputeDevice("test", "cpu", "cpu", "bfloat16", "test")
    reduced = run_frozen(lin, x, bf16, batch_size=3, fn=lambda m, xb: m(xb))
    ok, worst, mean = autocast_agrees(out, reduced, min_cosine=0.99)
    assert ok and 0.99 < worst <= mean <= 1.0 + 1e-9
    assert not np.array_equal(out, reduced)  # the autocast really ran in bf16


def test_cosine_rows_and_the_agreement_check():
    a = np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    assert np.allclose(cosine_rows(a, b), [1.0, np.sqrt(0.5), 1.0])
    ok, worst, _ = autocast_agrees(a, b)
    assert not ok and worst == pytest.approx(np.sqrt(0.5)) and AUTOCAST_MIN_COSINE > worst
    assert autocast_agrees(a, a)[0]
    with pytest.raises(ValueError, match="shapes"):
        cosine_rows(a, b[:2])
