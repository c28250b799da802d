"""Matrix-multiply peak throughput of this machine, per backend and precision (the bench's yardstick).

The peak is the best median GFLOP/s over a few matmul shapes, run through the same backend,
precision and thread count as the model being benchmarked (2 FLOP per MAC). Each measurement is a
*chain* of ``DEPTH`` matmuls with constant weights, ``(M, K) x (K, N)`` then ``(M, N) x (N, N)``:
inside a real quantized network each matmul's output feeds the next one's input quantizer, so the
(de)quantization fuses into the kernels. A single float-in/float-out matmul would instead charge
the peak for quantizing its whole input and dequantizing its output (it measured about 60 % of
the chained figure for INT8 on this CPU) and so flatter every model compared with it.

- OpenVINO: MatMuls with constant weights; ``f32`` / ``bf16`` / ``f16`` via the inference
  precision hint, ``int8`` via FakeQuantize on every matmul's inputs (what NNCF's IR looks like,
  so the CPU plugin uses the same low-precision kernels: VNNI / AMX-INT8 where present);
- ONNX Runtime (needs the ``onnx`` package to build the graph): ``fp32`` MatMuls, ``int8`` U8S8
  QDQ MatMuls that ONNX Runtime fuses into its integer kernels.
"""

from __future__ import annotations

import numpy as np

from edge.device.timing import median_seconds

SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1024), (4096, 1024, 1024), (1024, 2048, 2048), (4096, 512, 512))
DEPTH = 8


def _weights(k: int, n: int, depth: int) -> list[np.ndarray]:
    """Scaled so activations keep unit size along the chain (the quantizer ranges stay meaningful)."""
    rng = np.random.default_rng(0)
    dims = [k] + [n] * depth
    return [(rng.standard_normal((dims[i], dims[i + 1])) / np.sqrt(dims[i])).astype(np.float32) for i in range(depth)]


def _openvino_runner(m: int, k: int, n: int, precision: str, num_threads: int | None, depth: int = DEPTH):
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([m, k], ov.Type.f32, name="x")
    a = x
    lo, hi = ops.constant(np.float32(-4.0)), ops.constant(np.float32(4.0))
    for w in _weights(k, n, depth):
        wc = ops.constant(w)
        if precision == "int8":
            a = ops.fake_quantize(a, lo, hi, lo, hi, 256)
            wc = ops.fake_quantize(wc, lo, hi, lo, hi, 255)
        a = ops.matmul(a, wc, False, False)
    model = ov.Model([a], [x])
    config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision, "PERFORMANCE_HINT": "LATENCY"}
    if num_threads:
        config["INFERENCE_NUM_THREADS"] = int(num_threads)
    req = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    return lambda inp: req.infer({0: inp})


def _onnxruntime_runner(m: int, k: int, n: int, precision: str, num_threads: int | None, depth: int = DEPTH):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    inits, nodes, a = [], [], "x"
    if precision == "int8":
        inits += [numpy_helper.from_array(np.float32(8.0 / 255), "xs"), numpy_helper.from_array(np.uint8(128), "xz"),
                  numpy_helper.from_array(np.int8(0), "wz")]
    for i, w in enumerate(_weights(k, n, depth)):
        if precision == "int8":
            scale = float(np.abs(w).max()) / 127
            inits += [numpy_helper.from_array(np.clip(np.round(w / scale), -127, 127).astype(np.int8), f"Wq{i}"),
                      numpy_helper.from_array(np.float32(scale), f"ws{i}")]
            nodes += [helper.make_node("QuantizeLinear", [a, "xs", "xz"], [f"xq{i}"]),
                      helper.make_node("DequantizeLinear", [f"xq{i}", "xs", "xz"], [f"xd{i}"]),
                      helper.make_node("DequantizeLinear", [f"Wq{i}", f"ws{i}", "wz"], [f"Wd{i}"]),
                      helper.make_node("MatMul", [f"xd{i}", f"Wd{i}"], [f"y{i}"])]
        else:
            inits.append(numpy_helper.from_array(w, f"W{i}"))
            nodes.append(helper.make_node("MatMul", [a, f"W{i}"], [f"y{i}"]))
        a = f"y{i}"
    graph = helper.make_graph(nodes, "peak", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info(a, TensorProto.FLOAT, [m, n])], initializer=inits)
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
        flops = 2.0 * m * (k * n + (DEPTH - 1) * n * n)
        best = max(best, flops / median_seconds(run, x, duration=min_seconds, min_runs=min_iters) / 1e9)
    return best


def compute_precision(backend: str, graph_precision: str, inference_precision: str | None) -> str:
    """The precision the matmuls of a model really run at (what its peak must be measured at)."""
    if graph_precision == "int8":
        return "int8"
    if backend == "openvino":
        return inference_precision or "f32"
    # ONNX Runtime's CPU provider runs fp16 graphs' matmuls through fp32 kernels (casts inserted).
    return "fp32"
