"""Build side of an edge release (torch, onnx, nncf; runs on the coordinator's or IT's build machine).

    export.py             task model -> ONNX (parity-checked against PyTorch)
    evaluate.py           calibration / validation sets from data specs; metrics of any predictor
    quantize.py           NNCF INT8 (OpenVINO), ONNX Runtime QDQ INT8, FP16
    gate.py               FP32 vs candidate: refuse a drop beyond the bound
    compile_openvino.py   OpenVINO IR with an explicit inference precision
    compile_onnxruntime.py  portable, checked ONNX for ONNX Runtime
    compile_tensorrt.py   TensorRT engine (10.x / 11.x), built on the NVIDIA device
    compiled.py           what every compile step takes and returns; the bundle layout
    bundling.py           manifest, model card, self-test, signature (edge build and edge bundle)
    pipeline.py           build(): all of the above + verify, with a summary

What differs per target comes from one row of :data:`edge.targets.TARGETS`.
"""
