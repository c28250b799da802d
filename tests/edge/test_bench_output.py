"""`edge bench`: timing by duration, benchmark_app as the external reference, a table that survives a pipe, --json.

Runs on the tiny signed sample bundle (a 3-class linear head on 16x16 inputs, ONNX) so each
benchmark takes a fraction of a second; the numbers are not the point here, the bookkeeping is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echocare.bundle import generate_keypair
from echofleet.cli.edge import edge_app
from edge.bench.latency import (
    BenchmarkAppError,
    Candidate,
    bench_candidates,
    benchmark_app_reference,
    find_benchmark_app,
    parse_benchmark_app,
)
from server.registry.sample_bundle import SIZE, make_classifier_bundle

ROOT = Path(__file__).resolve().parents[2]

# the end of a real `benchmark_app -hint latency -t 4` run (OpenVINO 2026.4)
BENCHMARK_APP_TAIL = """\
[ INFO ] First inference took 126.89 ms
[Step 11/11] Dumping statistics report
[ INFO ] Execution Devices:['CPU']
[ INFO ] Count:            26 iterations
[ INFO ] Duration:         4038.24 ms
[ INFO ] Latency:
[ INFO ]    Median:        150.79 ms
[ INFO ]    Average:       153.80 ms
[ INFO ]    Min:           116.34 ms
[ INFO ]    Max:           211.19 ms
[ INFO ] Throughput:   6.44 FPS
"""


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bench")
    priv, pub = generate_keypair(tmp / "k")
    return make_classifier_bundle(tmp / "dist", priv, "1"), pub


def _model(bundle: Path, tmp: Path) -> Path:
    import tarfile

    with tarfile.open(bundle) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith("model.onnx"))
        member.name = "model.onnx"
        tf.extract(member, tmp, filter="data")
    return tmp / "model.onnx"


def test_parse_benchmark_app_statistics() -> None:
    s = parse_benchmark_app(BENCHMARK_APP_TAIL)
    assert s == {"p50_ms": 150.79, "runs": 26, "mean_ms": 153.80, "min_ms": 116.34, "max_ms": 211.19,
                 "duration_ms": 4038.24, "throughput_fps": 6.44}
    # sub-millisecond models: benchmark_app switches to microseconds
    tiny = parse_benchmark_app("[ INFO ] Count:            15489 iterations\n[ INFO ]    Median:        5.42 us\n"
                               "[ INFO ]    Average:       119.70 us\n[ INFO ] Duration:         2003.76 ms\n")
    assert tiny == {"p50_ms": pytest.approx(0.00542), "runs": 15489, "mean_ms": pytest.approx(0.1197), "duration_ms": 2003.76}
    with pytest.raises(BenchmarkAppError, match="no latency statistics"):
        parse_benchmark_app("[ ERROR ] Model file does not exist\n")


def test_timing_runs_for_the_duration_and_reports_the_spread(sample, tmp_path: Path) -> None:
    onnx = _model(sample[0], tmp_path)
    cands = [Candidate("a [onnxruntime]", onnx, "onnxruntime"), Candidate("b [openvino/f32]", onnx, "openvino", inference_precision="f32")]
    rep = bench_candidates(cands, SIZE, batch=2, warmup=1, iters=3, duration=0.3, with_peak=False)
    assert rep.duration_s == 0.3
    for r in rep.rows:
        assert r.runs >= 3 and r.timed_s >= 0.3  # ran until both the duration and the minimum count were met
        assert r.runs > 10  # a sub-millisecond model: far more runs than the minimum
        assert 0 < r.p50_ms <= r.p90_ms <= r.p95_ms and r.mean_ms > 0
        assert r.mean_ms == pytest.approx(1e3 * r.timed_s / r.runs)
    fixed = bench_candidates(cands[:1], SIZE, batch=2, warmup=1, iters=4, duration=0.0, with_peak=False)
    assert fixed.rows[0].runs == 4  # no duration: exactly the minimum


@pytest.mark.skipif(find_benchmark_app() is None, reason="OpenVINO's benchmark_app is not installed")
def test_benchmark_app_reference_on_the_same_model(sample, tmp_path: Path) -> None:
    onnx = _model(sample[0], tmp_path)
    ref = benchmark_app_reference(onnx, SIZE, "f32", duration=1)
    assert ref["runs"] > 0 and 0 < ref["p50_ms"] < 50  # a 16x16 linear head: well under a millisecond unloaded
    assert ref["duration_ms"] >= 900  # it ran for the duration asked
    assert "-hint latency" in ref["command"] and "-infer_precision f32" in ref["command"] and f"[1,3,{SIZE},{SIZE}]" in ref["command"]
    with pytest.raises(BenchmarkAppError, match="exit code"):
        benchmark_app_reference(tmp_path / "missing.xml", SIZE, duration=1)


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(("┃", "│"))]


def test_piped_table_does_not_wrap_and_json_is_clean(sample) -> None:
    bundle, pub = sample
    env = {**os.environ, "COLUMNS": "80", "TERM": "xterm"}
    res = subprocess.run([sys.executable, "-m", "echofleet.cli", "edge", "bench", str(bundle), "--pubkey", str(pub),
                          "--iters", "3", "--batch", "2", "--no-peak"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = _table_lines(res.stdout)
    header = next(line for line in lines if line.startswith("┃"))
    columns = [c.strip() for c in header.strip("┃").split("┃")]
    rows = [line for line in lines if line.startswith("│")]
    # one line per header and per model: nothing folded into 80 columns
    assert len([line for line in lines if line.startswith("┃")]) == 1 and len(rows) == 2, res.stdout
    assert {"p50 ms", "p90 ms", "mean ms", "runs"} <= set(columns), columns
    labels = [r.strip("│").split("│")[0].strip() for r in rows]
    assert labels == ["model.onnx [onnxruntime]", "model.onnx [openvino/f32]"], labels
    if find_benchmark_app() is not None:  # the reference beside the OpenVINO row
        assert "benchmark_app p50 ms" in columns
        ov = dict(zip(columns, (c.strip() for c in rows[1].strip("│").split("│"))))
        assert ov["benchmark_app p50 ms"].endswith("runs)") and ov["runtime - benchmark_app ms"] != "-"

    out = CliRunner().invoke(edge_app, ["bench", str(bundle), "--pubkey", str(pub), "--iters", "2", "--batch", "2",
                                        "--no-peak", "--no-reference", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)  # stdout is the JSON alone (progress goes to stderr)
    assert data["duration_s"] == 0 and [r["runs"] for r in data["rows"]] == [2, 2]
    assert all(r["reference"] is None and r["p90_ms"] > 0 for r in data["rows"])
