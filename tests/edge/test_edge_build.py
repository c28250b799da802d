"""End to end: build() -> signed bundle -> verify -> infer on real BUSI images through the torch-free runtime.

One OpenVINO INT8 build of a BUSI-fitted tiny classifier (from a federation run directory) and
one ONNX Runtime FP32 segmentation build are shared by the tests of this file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from edge_helpers import (
    LABELS,
    busi_spec,
    fresh_model,
    run_py,
    torch_free_env,
)

from echocare.bundle import BundleError
from edge.build.gate import GateBounds, GateFailed
from edge.build.pipeline import BuildConfig, build
from edge.device.runtime import load_bundle


@pytest.fixture(scope="module")
def cls_build(tmp_path_factory, busi_root, classifier_run, release_keys):
    tmp = tmp_path_factory.mktemp("build-cls")
    summary = build(classifier_run, "openvino-cpu", busi_spec(busi_root, 24, 5), busi_spec(busi_root, 45, 11), release_keys[0], tmp / "dist",
                    config=BuildConfig(version="7", device_class="cart"))
    return tmp, summary


@pytest.fixture(scope="module")
def seg_build(tmp_path_factory, busi_root, release_keys):
    tmp = tmp_path_factory.mktemp("build-seg")
    model = fresh_model(tmp / "seg", "segment")
    summary = build(model, "onnxruntime-cpu", None, busi_spec(busi_root, 12, 3), release_keys[0], tmp / "dist",
                    config=BuildConfig(precision="fp32", version="1"))
    return tmp, summary


def _busi_images(busi_root: Path, n: int) -> list[Path]:
    return sorted(p for p in (busi_root / "malignant").glob("*.png") if "_mask" not in p.name)[:n]


def test_build_summary_manifest_and_model_card(cls_build) -> None:
    _, s = cls_build
    assert s.ok and s.gate.passed and s.selftest[0], s.selftest
    assert [st.name for st in s.steps] == ["data", "export", "quantize", "gate", "compile", "bundle", "verify"]
    m = s.manifest
    assert m["name"] == "classify-echocare-tiny-openvino-cpu" and m["version"] == "7" and m["device_class"] == "cart"
    assert m["task"] == "classify" and m["labels"] == LABELS and m["precision"] == "int8"
    assert m["preprocess"]["size"] == 256 and m["input"]["shape"] == [-1, 3, 256, 256]
    model = next(a for a in m["artifacts"] if a["role"] == "model")
    assert model["format"] == "openvino-ir" and model["precision"] == "int8" and model["inference_precision"] == "f32"
    assert all(len(a["sha256"]) == 64 for a in m["artifacts"])
    card = m["model_card"]
    assert card["sites"] == ["site-a", "site-b"] and card["rounds"] == 2
    assert card["privacy"]["site-b"]["epsilon"] == pytest.approx(4.0) and card["excluded_sites"] == ["site-c"]
    v = card["validation"]
    assert v["samples"] == 45 and set(v) >= {"fp32", "int8", "gate"} and v["gate"]["passed"]
    text = json.dumps(m)
    assert "/secret/site/path" not in text and "busi:/" not in text  # no site paths ship to scanners
    assert m["quantization"]["method"] == "nncf" and m["encoder"]["config"] == "echocare-tiny"


def test_verify_tampered_bundle_refused_by_cli(cls_build, release_keys, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from echofleet.cli.edge import edge_app

    _, s = cls_build
    runner = CliRunner()
    ok = runner.invoke(edge_app, ["verify", str(s.tarball), "--pubkey", str(release_keys[1])])
    assert ok.exit_code == 0 and "signature OK" in ok.output, ok.output
    copy = tmp_path / s.bundle_dir.name
    shutil.copytree(s.bundle_dir, copy)
    weights = copy / "model" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 3] ^= 0x80
    weights.write_bytes(bytes(data))
    bad = runner.invoke(edge_app, ["verify", str(copy), "--pubkey", str(release_keys[1])])
    assert bad.exit_code == 1 and "REFUSED" in bad.output and "model/model.bin" in bad.output
    with pytest.raises(BundleError):
        load_bundle(copy, public_key=release_keys[1])
    inf = runner.invoke(edge_app, ["infer", str(copy), str(copy / "manifest.json"), "--pubkey", str(release_keys[1])])
    assert inf.exit_code == 1 and "REFUSED" in inf.output


def test_torch_free_infer_on_busi_matches_the_gated_model(cls_build, release_keys, busi_root, tmp_path: Path) -> None:
    """`python -m echofleet.cli.edge infer` with torch blocked: verifies, preprocesses, runs OpenVINO INT8, prints probabilities."""
    _, s = cls_build
    env = torch_free_env(tmp_path)
    sanity = run_py(["-c", "import torch"], env=env)
    assert sanity.returncode != 0 and "torch is blocked" in sanity.stderr
    images = _busi_images(busi_root, 3)
    res = run_py(["-m", "echofleet.cli.edge", "infer", str(s.tarball), *map(str, images), "--pubkey", str(release_keys[1]), "--json"], env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["bundle"]["backend"] == "openvino" and out["bundle"]["session"]["inference_precision"] == "f32"
    assert len(out["results"]) == 3
    # Same numbers as the runtime in this (torch-enabled) process. One image per call, as the CLI
    # does: OpenVINO's INT8 outputs shift slightly with the batch an image is run in.
    with load_bundle(s.tarball, public_key=release_keys[1]) as rt:
        from echocare.data.images import read_image

        here = [rt.predict([read_image(p)])[0] for p in images]
    for r, h in zip(out["results"], here):
        assert set(r["probabilities"]) == set(LABELS)
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        for k in LABELS:
            assert r["probabilities"][k] == pytest.approx(h["probabilities"][k], abs=1e-5)


def test_full_cli_entry_point_is_torch_free(cls_build, release_keys, busi_root, tmp_path: Path) -> None:
    """`echofleet edge infer` (the whole CLI, every package's commands registered) also runs without torch."""
    _, s = cls_build
    res = run_py(["-m", "echofleet.cli", "edge", "infer", str(s.bundle_dir), str(_busi_images(busi_root, 1)[0]),
                  "--pubkey", str(release_keys[1])], env=torch_free_env(tmp_path))
    assert res.returncode == 0, res.stderr
    assert "malignant" in res.stdout and "openvino" in res.stdout


def test_self_test_detects_a_wrong_expected_output(cls_build, tmp_path: Path) -> None:
    _, s = cls_build
    copy = tmp_path / "b"
    shutil.copytree(s.bundle_dir, copy)
    with load_bundle(copy) as rt:
        assert rt.self_test()[0]
    m = json.loads((copy / "manifest.json").read_text())
    probs = np.asarray(m["selftest"]["outputs"]["model/model.xml"]["probabilities"])
    m["selftest"]["outputs"]["model/model.xml"]["probabilities"] = probs[:, ::-1].tolist()  # classes permuted
    (copy / "manifest.json").write_text(json.dumps(m))
    with load_bundle(copy) as rt:  # unverified on purpose: the self-test itself must notice
        ok, msg = rt.self_test()
    assert not ok and "differ" in msg


def test_segment_bundle_infer_writes_dice_ready_masks(seg_build, release_keys, busi_root, tmp_path: Path) -> None:
    from echocare.data.images import read_image

    _, s = seg_build
    assert s.ok and s.manifest["precision"] == "fp32" and s.selftest[0]
    images = _busi_images(busi_root, 2)
    res = run_py(["-m", "echofleet.cli.edge", "infer", str(s.tarball), *map(str, images), "--pubkey", str(release_keys[1]),
                  "--masks-dir", str(tmp_path / "masks"), "--json"], env=torch_free_env(tmp_path))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["bundle"]["backend"] == "onnxruntime"
    for r, img in zip(out["results"], images):
        mask = read_image(r["masks"][0])
        gt = read_image(img.with_name(img.stem + "_mask.png"))
        assert mask.shape[:2] == gt.shape[:2] == read_image(img).shape[:2]  # same pixel grid as the image and its GT
        assert set(np.unique(mask)) <= {0, 255}
        assert r["foreground_fraction"][0] == pytest.approx((mask > 0).mean(), abs=1e-6)


def test_gate_failure_stops_the_build(tmp_path: Path, busi_root, release_keys) -> None:
    model = fresh_model(tmp_path / "m", "classify")
    with pytest.raises(GateFailed, match="gate FAILED") as e:
        build(model, "onnxruntime-cpu", None, busi_spec(busi_root, 15, 2), release_keys[0], tmp_path / "dist",
              config=BuildConfig(precision="fp32", bounds=GateBounds(auroc_points=-50.0), version="1"))
    assert [st.name for st in e.value.summary.steps][-1] == "gate"
    assert not list((tmp_path / "dist").glob("*.tar.gz"))  # nothing bundled past a failed gate
