"""Matrix-multiply peak throughput of this machine, per backend and precision (the bench's yardstick).

The peak is the best median GFLOP/s over a few large matmul shapes, run through the same
backend, precision and thread count as the model being benchmarked (2 FLOP per MAC):

- OpenVINO: a MatMul with a constant weight; ``f32`` / ``bf16`` / ``f16`` via the inference
  precision hint, ``int8`` via FakeQuantize on both inputs (what NNCF's IR looks like, so the
  CPU plugin uses the same low-precision kernels: VNNI / AMX-INT8 where present);
- ONNX Runtime (needs the ``onnx`` package to build the graph): ``fp32`` MatMul, ``int8`` a
  U8S8 QDQ MatMul that ONNX Runtime fuses into its integer kernel.
"""

from __future__ import annotations

import time

import numpy as np

SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1024), (1024, 1024, 4096), (4096, 4096, 1024))


def _median_seconds(run, x: np.ndarray, min_iters: int, min_seconds: float) -> float:
    for _ in range(2):
        run(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _openvino_runner(m: int, k: int, n: int, precision: str, num_threads: int | None):
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([m, k], ov.Type.f32, name="x")
    w = ops.constant(rng.standard_normal((k, n)).astype(np.float32))
    a = x
    if precision == "int8":
        lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
        a = ops.fake_quantize(x, lo, hi, lo, hi, 256)
        w = ops.fake_quantize(w, lo, hi, lo, hi, 255)
    model = ov.Model([ops.matmul(a, w, False, False)], [x])
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision, "PERFORMANCE_HINT": "LATENCY"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    req = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return lambda inp: req.infer({0: inp})


def _onnxruntime_runner(m: int, k: int, n: int, precision: str, num_threads: int | None):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype(np.float32)
    inits = []
    if precision == "int8":
        wq = np.clip(np.round(w / (4.0 / 127)), -127, 127).astype(np.int8)
        inits = [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(np.float32(4.0 / 127), "ws"),
                 numpy_helper.from_array(np.int8(0), "wz"), numpy_helper.from_array(np.float32(8.0 / 255), "xs"),
                 numpy_helper.from_array(np.uint8(128), "xz")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["Wd"]),
                 helper.make_node("MatMul", ["xd", "Wd"], ["y"])]
    else:
        inits = [numpy_helper.from_array(w, "W")]
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda inp: sess.run(None, {"x": inp})


def matmul_peak_gflops(backend: str, precision: str, *, shapes=SHAPES, num_threads: int | None = None,
                       min_iters: int = 5, min_seconds: float = 0.5) -> float:
    """Best median GFLOP/s over ``shapes`` for ``backend`` ("openvino" | "onnxruntime") at ``precision``.

    precision: OpenVINO ``f32`` | ``bf16`` | ``f16`` | ``int8``; ONNX Runtime ``fp32`` | ``int8``.
    """
    make = {"openvino": _openvino_runner, "onnxruntime": _onnxruntime_runner}.get(backend)
    if make is None:
        raise ValueError(f"no matmul peak for backend {backend!r}")
    best = 0.0
    rng = np.random.default_rng(1)
    for m, k, n in shapes:
        run = make(m, k, n, precision, num_threads)
        x = rng.standard_normal((m, k)).astype(np.float32)
        best = max(best, 2.0 * m * k * n / _median_seconds(run, x, min_iters, min_seconds) / 1e9)
    return best


def compute_precision(backend: str, graph_precision: str, inference_precision: str | None) -> str:
    """The precision the matmuls of a model really run at (what its peak must be measured at)."""
    if graph_precision == "int8":
        return "int8"
    if backend == "openvino":
        return inference_precision or "f32"
    # ONNX Runtime's CPU provider runs fp16 graphs' matmuls through fp32 kernels (casts inserted).
    return "fp32"
