"""Scanner side of an edge release: never imports torch nor :mod:`edge.build` (import-linter checks).

    runtime.py      load_bundle(...).predict(images) / .self_test()
    backends.py     OpenVINO and ONNX Runtime sessions
    inputs.py       images, DICOM and clips -> frames (the data layer's decoders)
    postprocess.py  logits -> probabilities / masks on the source grid / head circumference
    infer.py        files -> one result each (mask PNGs written atomically), for `edge infer`
    agent.py        keeps a scanner on the registry's current release (verify, install, roll back)
"""
