"""The step-by-step CLI (export -> compile -> bundle -> verify -> infer/bench) and the runtime on DICOM and clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from echocare.bundle import BundleError, generate_keypair
from echofleet.cli.edge import edge_app
from edge.device.runtime import choose_model, load_bundle
from edge_helpers import LABELS, busi_spec, fresh_model, run_py, torch_free_env

runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(edge_app, args)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.fixture(scope="module")
def cli_bundle(tmp_path_factory, busi_root):
    """export -> compile (onnxruntime-cpu) -> bundle, each through the CLI."""
    tmp = tmp_path_factory.mktemp("cli")
    model = fresh_model(tmp / "m", "classify")
    priv, pub = generate_keypair(tmp / "k")
    _ok(["export", str(model), "--out", str(tmp / "export"), "--samples", busi_spec(busi_root, 2, 0)])
    _ok(["compile", str(tmp / "export" / "model.onnx"), "--target", "onnxruntime-cpu", "--out", str(tmp / "ort")])
    out = _ok(["bundle", str(tmp / "ort" / "model.onnx"), "--target", "onnxruntime-cpu", "--key", str(priv),
               "--out", str(tmp / "dist"), "--export-info", str(tmp / "export" / "export.json"),
               "--selftest-data", busi_spec(busi_root, 2, 1), "--version", "3"])
    tar = tmp / "dist" / "classify-echocare-tiny-onnxruntime-cpu-3.tar.gz"
    assert str(tar) in out.replace("\n", "")
    return tmp, model, tar, pub


def test_verify_and_self_test(cli_bundle) -> None:
    _, _, tar, pub = cli_bundle
    out = _ok(["verify", str(tar), "--pubkey", str(pub)])
    assert "signature OK, all hashes OK" in " ".join(out.split())
    out = _ok(["verify", str(tar), "--pubkey", str(pub), "--json"])
    manifest = json.loads(out)
    assert [a["path"] for a in manifest["artifacts"] if a.get("role") == "model"] == ["model/model.onnx"]
    assert manifest["selftest"]["input"] == "selftest/input.npy" and manifest["precision"] == "fp32"
    with load_bundle(tar, public_key=pub) as rt:
        ok, msg = rt.self_test()
        assert ok, msg
        assert rt.backend == "onnxruntime" and rt.labels == LABELS
        bundle_dir = rt.bundle_dir
    assert not bundle_dir.exists()  # the unpacked temporary copy is removed on close


def test_infer_dicom_video_and_a_corrupt_file(cli_bundle, pocus_root, tmp_path: Path) -> None:
    """Torch-free: DICOM (RGB, palette, JPEG 2000, 30-frame YBR), an mp4 clip, and a corrupt PNG (reported, skipped)."""
    from pydicom.data import get_testdata_file

    _, _, tar, pub = cli_bundle
    dicoms = [get_testdata_file(n) for n in ("examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm", "examples_ybr_color.dcm")]
    clip = sorted((pocus_root / "data" / "pocus_videos").rglob("*.mp4"))[0]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    res = run_py(["-m", "echofleet.cli.edge", "infer", str(tar), *dicoms, str(clip), str(bad), "--pubkey", str(pub), "--json", "--max-frames", "4"],
                 env=torch_free_env(tmp_path))
    assert res.returncode == 2, res.stderr  # one input failed
    out = json.loads(res.stdout)["results"]
    assert len(out) == 6
    for r in out[:5]:
        assert set(r["probabilities"]) == set(LABELS) and abs(sum(r["probabilities"].values()) - 1) < 1e-4
    assert out[3]["frames"] == 4 and len(out[3]["per_frame_labels"]) == 4  # multi-frame DICOM: 4 evenly spaced frames
    assert out[4]["frames"] == 4  # clip
    assert out[5]["input"] == str(bad) and "error" in out[5]


def test_backend_forcing_and_fallback(cli_bundle) -> None:
    _, _, tar, pub = cli_bundle
    with load_bundle(tar, "openvino", public_key=pub) as rt:  # OpenVINO reads the ONNX artifact too
        assert rt.backend == "openvino"
        ok, msg = rt.self_test()
        assert ok, msg
    manifest = {"name": "x", "version": "1", "artifacts": [{"path": "model/model.xml", "role": "model", "format": "openvino-ir"}]}
    with pytest.raises(BundleError, match="no model artifact .*openvino-ir.* runs on backend 'onnxruntime'"):
        choose_model(manifest, "onnxruntime")


def test_predict_rejects_wrong_shapes(cli_bundle) -> None:
    _, _, tar, pub = cli_bundle
    with load_bundle(tar, public_key=pub) as rt:
        with pytest.raises(ValueError, match=r"\(N, 3, 256, 256\)"):
            rt.predict_arrays(np.zeros((1, 3, 128, 128), np.float32))
        assert rt.predict([]) == []
        res = rt.predict([np.full((300, 400), 80, np.uint8), np.zeros((50, 60, 3), np.uint8)])
        assert len(res) == 2 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in res)


def test_bench_reports_ratios_against_torch(cli_bundle) -> None:
    from edge.bench.latency import bench_bundle

    _, model, tar, pub = cli_bundle
    rep = bench_bundle(tar, public_key=pub, batch=2, warmup=1, iters=3, torch_model=model, peak_shapes=((512, 512, 512),))
    labels = [r.label for r in rep.rows]
    assert labels[0] == "pytorch-eager" and any("[onnxruntime]" in x for x in labels) and any("[openvino/f32]" in x for x in labels)
    base = rep.rows[0]
    assert base.speedup_vs_torch == pytest.approx(1.0)
    for r in rep.rows:
        assert 0 < r.p50_ms <= r.p95_ms and r.throughput_ips > 0
        assert r.gflops == pytest.approx(rep.flops_per_image / (r.p50_ms / 1e3) / 1e9)
        assert r.speedup_vs_torch == pytest.approx(base.p50_ms / r.p50_ms)
        assert r.peak_gflops and r.peak_gflops > 0 and r.peak_fraction == pytest.approx(r.gflops / r.peak_gflops)
        assert r.throughput_gflops == pytest.approx(rep.flops_per_image * r.throughput_ips / 1e9)
        assert r.throughput_peak_fraction == pytest.approx(r.throughput_gflops / r.peak_gflops)
    # The CLI finds the PyTorch model by itself (recorded in the manifest at build time).
    out = _ok(["bench", str(tar), "--pubkey", str(pub), "--iters", "2", "--batch", "2", "--no-peak", "--profile", "--json",
               "--no-reference"])  # benchmark_app beside it: tests/edge/test_bench_output.py
    data = json.loads(out[out.index("{"):])
    assert data["rows"][0]["label"] == "pytorch-eager" and data["flops_per_image"] == rep.flops_per_image
    # --profile: where each OpenVINO model's time goes (ONNX Runtime models are not profiled)
    assert data["profiles"] and all("[openvino" in label for label in data["profiles"])
    assert all(0 < p["matmul_share"] < 1 and p["kernel_gflops"] > 0 for p in data["profiles"].values())


def test_op_profile_splits_the_time_between_matmuls_and_the_rest(cli_bundle) -> None:
    from edge.bench.opprofile import MATMUL_TYPES, profile_openvino

    tmp = cli_bundle[0]
    flops = json.loads((tmp / "export" / "export.json").read_text())["flops_per_image"]
    prof = profile_openvino(tmp / "export" / "model.onnx", 256, batch=1, iters=2)
    assert prof.latency_ms > 0 and prof.total_ms > 0
    assert any(k in MATMUL_TYPES for k in prof.by_type_ms) and any(k not in MATMUL_TYPES for k in prof.by_type_ms)
    assert 0 < prof.matmul_share < 1 and prof.matmul_ms == pytest.approx(prof.matmul_share * prof.total_ms)
    assert prof.kernel_gflops(flops) == pytest.approx(flops / (prof.matmul_ms / 1e3) / 1e9)
    # Amdahl: matmuls at an (absurdly) high peak take no time, so the ceiling tends to 0; at a tiny peak, to 1
    assert prof.ceiling_fraction(flops, 1e9) < 0.01 < 0.99 < prof.ceiling_fraction(flops, 1e-6)


def test_openvino_compile_records_the_precision(cli_bundle, tmp_path: Path) -> None:
    tmp = cli_bundle[0]
    out = _ok(["compile", str(tmp / "export" / "model.onnx"), "--target", "openvino-cpu", "--inference-precision", "bf16", "--out", str(tmp_path)])
    assert "inference bf16" in out
    from edge.device.backends import open_session

    x = np.load(next((tmp / "dist").glob("*/selftest/input.npy")))
    f32 = open_session(tmp_path / "model.xml", "openvino", inference_precision="f32")
    bf16 = open_session(tmp_path / "model.xml", "openvino", inference_precision="bf16")
    assert (f32.info.details["inference_precision"], bf16.info.details["inference_precision"]) == ("f32", "bf16")
    ref = open_session(tmp / "export" / "model.onnx", "onnxruntime").run(x)
    # f32 reproduces ONNX Runtime; bf16 (8-bit mantissa) measurably does not: the hint really applies.
    assert np.abs(f32.run(x) - ref).max() < 1e-4 < np.abs(bf16.run(x) - ref).max()


def test_openvino_session_shares_the_input_and_returns_its_own_output(tmp_path: Path) -> None:
    """The per-call overhead fix: the input is handed to OpenVINO without a copy, and each call's
    output is copied out of the request's buffer once (the next call must not overwrite it)."""
    import openvino as ov
    import openvino.opset13 as ops

    from edge.device.backends import open_session

    inp = ops.parameter([-1, 3, 8, 8], np.float32, name="input")
    ov.save_model(ov.Model([ops.reduce_mean(inp, [2, 3], keep_dims=False)], [inp]), tmp_path / "mean.xml")
    session = open_session(tmp_path / "mean.xml", "openvino")
    a, b = np.ones((1, 3, 8, 8), np.float32), np.full((1, 3, 8, 8), 5.0, np.float32)
    out_a = session.run(a)
    out_b = session.run(b)
    np.testing.assert_array_equal(out_a, [[1, 1, 1]])  # not overwritten by the second call
    np.testing.assert_array_equal(out_b, [[5, 5, 5]])
    np.testing.assert_allclose(session.run(np.arange(192, dtype=np.float64).reshape(1, 3, 8, 8)),
                               [[31.5, 95.5, 159.5]])  # float64 input: converted, not misread
    sliced = np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(sliced[1:3]), sliced[1:3].mean(axis=(2, 3)), rtol=1e-5)
