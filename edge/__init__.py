"""Edge builds of EchoCare task models, and the torch-free runtime that runs them on scanners.

Build side (needs the ``train`` extra: torch, onnx, nncf ...), one module per step::

    export.py             task model -> ONNX (parity-checked against PyTorch)
    evaluate.py           calibration / validation sets from data specs; metrics of any predictor
    quantize.py           NNCF INT8 (OpenVINO), ONNX Runtime QDQ INT8, FP16
    gate.py               FP32 vs candidate: refuse a drop beyond the bound
    compile_openvino.py   OpenVINO IR with an explicit inference precision
    compile_onnxruntime.py  portable, checked ONNX for ONNX Runtime
    compile_tensorrt.py   TensorRT engine (10.x / 11.x), built on the NVIDIA device
    build.py              build(): all of the above + bundle + verify, with a summary
    bench.py, peak.py     latency / throughput vs PyTorch eager and vs the matmul peak

Device side (``pip install echofleet[edge]``: numpy, Pillow, cryptography, OpenVINO and/or ONNX
Runtime; never torch)::

    bundle.py    signed bundles: write, verify (signature + every hash), safe unpacking
    runtime.py   load_bundle(...).predict(images) / .self_test()
    backends.py  OpenVINO and ONNX Runtime sessions
    inputs.py    images, DICOM and clips -> frames (the data layer's decoders)
    postprocess.py  logits -> probabilities / masks on the source grid / head circumference

``cli.py`` exposes all of it as ``echofleet edge ...``; ``agent.py`` keeps a scanner on the
registry's current release.
"""
