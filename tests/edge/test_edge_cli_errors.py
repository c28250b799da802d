"""Every ``echofleet edge ...`` command answers a bad argument with one short ``error:`` line naming the
problem and exit code 2, before any work starts (no export, no quantization, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echocare.bundle import generate_keypair
from echofleet.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from server.registry.sample_bundle import make_classifier_bundle

    d = tmp_path_factory.mktemp("cli-errors")
    priv, pub = generate_keypair(d / "release")
    onnx = d / "model.onnx"
    onnx.write_bytes(b"not really onnx")  # no export.json beside it
    broken = d / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (d / "empty").mkdir()
    info = d / "info" / "export.json"  # a real export info, for a model in another folder
    info.parent.mkdir()
    info.write_text(json.dumps({"task": "classify", "labels": ["a", "b"], "preprocess": {}, "encoder": {"config": "echocare-tiny"},
                                "input": {"shape": [-1, 3, 16, 16]}, "output": {"shape": [-1, 2]}}))
    return {"dir": d, "priv": priv, "pub": pub, "onnx": onnx, "broken": broken, "empty": d / "empty", "info": info,
            "bundle": make_classifier_bundle(d / "dist", priv, "1.0.0")}


CASES = [
    # (id, argv with {placeholders}, what the one error line must name)
    ("build unknown target", "edge build {dir} --target tpu-9 --val phantom:4 --key {priv} --out {dir}/o", "unknown target 'tpu-9'"),
    ("build missing run dir", "edge build {dir}/nope --target openvino-cpu --val phantom:4 --key {priv} --out {dir}/o", "nope: no such run"),
    ("build missing key", "edge build {dir} --target openvino-cpu --val phantom:4 --key {dir}/nokey --out {dir}/o", "nokey: no such private key"),
    ("build bad precision", "edge build {dir} --target onnxruntime-cpu --precision int4 --val phantom:4 --key {priv} --out {dir}/o", "--precision 'int4'"),
    ("build int8 without calib", "edge build {dir} --target onnxruntime-cpu --val phantom:4 --key {priv} --out {dir}/o", "--calib"),
    ("build bad inference precision", "edge build {dir} --target openvino-cpu --precision fp32 --inference-precision f8 --val phantom:4 --key {priv} --out {dir}/o", "--inference-precision 'f8'"),
    ("build bad ignore op", "edge build {dir} --target openvino-cpu --calib phantom:4 --ignore-op conv --val phantom:4 --key {priv} --out {dir}/o", "unknown sensitive op kind"),
    ("build not a model dir", "edge build {empty} --target onnxruntime-cpu --precision fp32 --val phantom:4 --key {priv} --out {dir}/o", "neither a task-model directory"),
    ("export missing source", "edge export {dir}/nope --out {dir}/x", "nope: no such run"),
    ("export not a model dir", "edge export {empty} --out {dir}/x", "neither a task-model directory"),
    ("quantize missing model", "edge quantize {dir}/nope.onnx --method fp16", "nope.onnx: no such model"),
    ("quantize bad method", "edge quantize {onnx} --method int2", "--method 'int2'"),
    ("quantize int8 without calib", "edge quantize {onnx} --method nncf", "needs calibration images"),
    ("quantize without export info", "edge quantize {onnx} --method fp16", "no export.json beside it"),
    ("compile missing model", "edge compile {dir}/nope.onnx --target onnxruntime-cpu", "nope.onnx: no such model"),
    ("compile unknown target", "edge compile {onnx} --target jetson", "unknown target 'jetson'"),
    ("compile bad inference precision", "edge compile {onnx} --target openvino-cpu --inference-precision int8", "--inference-precision 'int8'"),
    ("compile missing trt config", "edge compile {onnx} --target tensorrt --config {dir}/tensorrt.json", "tensorrt.json: no such build config"),
    ("compile unreadable model", "edge compile {onnx} --target onnxruntime-cpu --out {dir}/c", "model.onnx: not a readable ONNX model"),
    ("bundle missing key", "edge bundle {onnx} --target onnxruntime-cpu --key {dir}/nokey --out {dir}/b", "nokey: no such private key"),
    ("bundle unknown target", "edge bundle {onnx} --target edgetpu --key {priv} --out {dir}/b", "unknown target 'edgetpu'"),
    ("bundle wrong artifact for target", "edge bundle {onnx} --target openvino-cpu --key {priv} --out {dir}/b --export-info {info}", "openvino-cpu bundle ships a openvino-ir model (.xml file)"),
    ("bundle bad export info", "edge bundle {onnx} --target onnxruntime-cpu --key {priv} --out {dir}/b --export-info {onnx}", "model.onnx: not a readable export info"),
    ("bundle missing export info", "edge bundle {onnx} --target onnxruntime-cpu --key {priv} --out {dir}/b", "no export.json beside it"),
    ("verify missing bundle", "edge verify {dir}/nope.tar.gz --pubkey {pub}", "nope.tar.gz: no such bundle"),
    ("verify missing pubkey", "edge verify {bundle} --pubkey {dir}/nope.pub", "nope.pub: no such public key"),
    ("infer missing bundle", "edge infer {dir}/nope.tar.gz {broken} --pubkey {pub}", "nope.tar.gz: no such bundle"),
    ("infer without pubkey", "edge infer {bundle} {broken}", "no --pubkey"),
    ("infer missing input", "edge infer {bundle} {dir}/scan.png --pubkey {pub}", "scan.png: no such input file"),
    ("infer unreadable image", "edge infer {bundle} {broken} --pubkey {pub}", "broken.png: "),
    ("infer bad backend", "edge infer {bundle} {broken} --pubkey {pub} --backend tpu", "--backend 'tpu'"),
    ("infer bad pixel size", "edge infer {bundle} {broken} --pubkey {pub} --pixel-mm -1", "--pixel-mm -1"),
    ("bench missing bundle", "edge bench {dir}/nope.tar.gz", "nope.tar.gz: no such bundle"),
    ("bench bad batch", "edge bench {bundle} --batch 0", "--batch 0"),
    ("keygen existing key", "edge keygen --out {priv}", "release"),
    ("agent missing pubkey", "edge agent -r localhost:1 -c cart --pubkey {dir}/nope.pub --dir {dir}/dev --insecure --once", "nope.pub: no such public key"),
    ("agent bad channel", "edge agent -r localhost:1 -c cart --pubkey {pub} --dir {dir}/dev --channel beta --once", "--channel 'beta'"),
    ("agent no token", "edge agent -r localhost:1 -c cart --pubkey {pub} --dir {dir}/dev --insecure --once", "no device token"),
    ("agent bad interval", "edge agent -r localhost:1 -c cart --pubkey {pub} --dir {dir}/dev --interval 0 --token t", "--interval 0"),
]


@pytest.mark.parametrize("argv, named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_argument_gets_one_error_line_and_exit_2(files, argv: str, named: str, monkeypatch) -> None:
    monkeypatch.delenv("ECHOFLEET_DEVICE_TOKEN", raising=False)
    monkeypatch.delenv("ECHOFLEET_PUBKEY", raising=False)
    res = runner.invoke(app, argv.format(**{k: str(v) for k, v in files.items()}).split())
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2, res.output
    assert len(lines) < 5 and lines[-1].startswith("error: "), res.output
    assert named in " ".join(lines), res.output
