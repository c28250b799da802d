"""Edge builds of EchoCare task models, and the torch-free runtime that runs them on scanners.

Two sides, kept apart by import-linter (pyproject.toml):

``edge.build``  (needs the ``train`` extra: torch, onnx, nncf ...) — export, quantize, gate, compile
                per target, and ``pipeline.build()`` that runs them all and writes a signed bundle.
``edge.device`` (``pip install echofleet[edge]``: numpy, Pillow, cryptography, OpenVINO and/or ONNX
                Runtime; never torch, never the build side) — runtime, backends, inputs,
                postprocessing and the scanner agent that keeps a scanner on the registry's release.
``edge.bench``  latency / throughput vs PyTorch eager and vs the measured matmul peak.

Shared by both sides: ``edge.targets`` (the one table of targets: what each ships, how it is
quantized, compiled, self-tested and run; torch-free) and ``edge.report`` (the tables the CLI,
``make demo`` and the benchmarks print).

The signed-bundle format itself (manifest, signing, verification, safe unpacking) is the contract of
the whole fleet and lives on the ground floor: :mod:`echocare.bundle`.
"""
