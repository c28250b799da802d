"""Tiny but real signed bundles, for registry/agent tests, the benchmark and loopback demos.

:func:`make_classifier_bundle` builds a 3-class linear classifier as an ONNX graph
(``Flatten -> MatMul -> Add``) on 16x16 inputs, a self-test sample and the probabilities the
model must reproduce (computed with numpy, independently of any inference backend), and signs it
all with :func:`echocare.bundle.write_bundle`. The edge runtime runs it like any exported EchoCare
head; ``broken=True`` ships weights that differ from the ones the expected outputs were computed
with, i.e. a bundle whose self-test genuinely fails on the device.

Each bundle carries a measured acceptance record (:class:`echocare.bundle.AcceptanceRecord`, so the
registry lets it go to stable): the shipped model's top-1 agreement with the reference weights on
64 synthetic inputs, ``method="central"``, bound 0. It is honest about what it is, a sample with
no clinical validation: a ``broken`` bundle disagrees and its record fails. ``acceptance=False``
ships no record at all (what the registry gate must refuse).

Needs ``onnx`` (the ``train`` extra); numpy only otherwise.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from echocare.preprocess import PreprocessSpec
from echocare.bundle import AcceptanceRecord, SiteAcceptance, write_bundle

LABELS = ["benign", "malignant", "normal"]
SIZE = 16


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _onnx_linear(weights: np.ndarray, bias: np.ndarray, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["mm"]),
            helper.make_node("Add", ["mm", "b"], ["logits"]),
        ],
        "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(LABELS)])],
        initializer=[numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="echofleet-sample")
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def make_classifier_bundle(
    out_dir: Path,
    private_key: Path,
    version: str,
    device_class: str = "cart",
    *,
    name: str = "tiny-classifier",
    broken: bool = False,
    payload_bytes: int = 0,
    seed: int = 0,
    acceptance: bool = True,
) -> Path:
    """Write a signed ``<name>-<version>.tar.gz`` into ``out_dir`` and return its path.

    ``payload_bytes`` adds a listed random artifact (to give downloads some weight).
    """
    rng = np.random.default_rng(seed)
    features = 3 * SIZE * SIZE
    weights = (rng.standard_normal((features, len(LABELS))) * 0.05).astype(np.float32)
    bias = rng.standard_normal(len(LABELS)).astype(np.float32)
    sample = rng.standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    expected = _softmax(sample.reshape(len(sample), -1).astype(np.float64) @ weights + bias)
    shipped = weights[:, ::-1].copy() if broken else weights  # broken: classes permuted

    with tempfile.TemporaryDirectory(prefix="sample-bundle-") as tmp:
        tmp = Path(tmp)
        _onnx_linear(shipped, bias, tmp / "model.onnx")
        np.save(tmp / "selftest.npy", sample)
        artifacts = {"model.onnx": tmp / "model.onnx", "selftest/input.npy": tmp / "selftest.npy"}
        described = [
            {"path": "model.onnx", "role": "model", "format": "onnx", "precision": "fp32", "target": "cpu"},
            {"path": "selftest/input.npy", "role": "selftest"},
        ]
        if payload_bytes:
            (tmp / "payload.bin").write_bytes(rng.bytes(payload_bytes))
            artifacts["payload.bin"] = tmp / "payload.bin"
            described.append({"path": "payload.bin", "role": "extra"})
        manifest = {
            "name": name,
            "version": version,
            "task": "classify",
            "device_class": device_class,
            "labels": LABELS,
            "preprocess": PreprocessSpec(size=SIZE).to_dict(),
            "input": {"name": "input", "shape": [1, 3, SIZE, SIZE]},
            "artifacts": described,
            "selftest": {
                "input": "selftest/input.npy",
                "outputs": {"model.onnx": {"probabilities": expected.astype(np.float32).tolist()}},
                "tolerance": {"probability_atol": 1e-3},
            },
        }
        if acceptance:
            manifest["acceptance"] = _agreement_record(weights, shipped, bias, seed)
        return write_bundle(Path(out_dir), manifest, artifacts, private_key)


def _agreement_record(reference: np.ndarray, shipped: np.ndarray, bias: np.ndarray, seed: int) -> dict:
    """The acceptance record of a sample bundle: top-1 agreement of ``shipped`` with ``reference``."""
    x = np.random.default_rng(seed + 10_000).standard_normal((64, reference.shape[0])).astype(np.float32)
    agreement = float(np.mean((x @ reference + bias).argmax(1) == (x @ shipped + bias).argmax(1)))
    delta = 1.0 - agreement
    site = SiteAcceptance(site="sample-generator", metric="top1_agreement", delta=delta, bound=0.0, p50_ms=None,
                          passed=delta <= 0.0, reason="" if delta <= 0.0 else f"agrees with the reference on {agreement:.0%}")
    return AcceptanceRecord(passed=site.passed, method="central", metric="top1_agreement", bound=0.0, quorum=1,
                            sites=(site,), reason=site.reason).to_dict()
