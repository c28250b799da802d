"""``--precision auto`` (issue 13): candidates built, gated and signed; the scanner times them and chooses.

One auto build of the BUSI-fitted tiny classifier is shared by the file. Its ``fp32`` candidate is
made to fail the gate through the real gate code (a bound it cannot meet, for that candidate only),
so the same build shows both a shipped set (>1 candidates) and a candidate left out with the reason.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from edge_helpers import busi_spec

from echocare.bundle import (
    FORMAT,
    BundleError,
    candidates_of,
    verify_bundle,
    write_bundle,
)
from edge.build import pipeline
from edge.build.gate import GateBounds
from edge.build.pipeline import BuildConfig, build
from edge.device.runtime import BundleRuntime, load_bundle

FAILED = "fp32"  # the candidate this file's build forces through a failing gate


@pytest.fixture(scope="module")
def auto_build(tmp_path_factory, busi_root, classifier_run, release_keys):
    tmp = tmp_path_factory.mktemp("build-auto")
    real_gate = pipeline.run_gate

    def gate(*args, candidate_name=None, **kw):  # the real gate; one candidate gets a bound it cannot meet
        if candidate_name == FAILED:
            args = list(args)
            args[6] = GateBounds(auroc_points=-50.0)
        return real_gate(*args, candidate_name=candidate_name, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(pipeline, "run_gate", gate)
    try:
        summary = build(classifier_run, "openvino-cpu", busi_spec(busi_root, 16, 5), busi_spec(busi_root, 30, 11), release_keys[0], tmp / "dist",
                        config=BuildConfig(precision="auto", version="3", calib_limit=16, candidate_seconds=0.1))
    finally:
        mp.undo()
    return tmp, summary


def test_auto_build_ships_every_gated_candidate_signed(auto_build, release_keys, tmp_path: Path) -> None:
    _, s = auto_build
    assert s.ok, s.selftest
    m = s.manifest
    assert m["format"] == "echofleet-bundle/2" and m["precision"] == "auto"
    cands = candidates_of(m)
    names = [c.name for c in cands]
    assert len(cands) > 1 and FAILED not in names and "int8-f32" in names, names
    for c in cands:
        assert c.gate["passed"] and c.metrics and c.build_p50_ms and c.build_p50_ms > 0
    models = {a["path"]: a for a in m["artifacts"] if a["role"] == "model"}
    assert {c.path for c in cands} <= set(models)
    assert {c.precision for c in cands} == {models[c.path]["precision"] for c in cands}
    assert set(m["selftest"]["outputs"]) == set(names)  # an expected output per candidate
    assert "every candidate" in s.selftest[1]
    # the central acceptance record is the worst shipped candidate's gate
    assert m["acceptance"]["passed"] and m["acceptance"]["method"] == "central"
    # tampering with one candidate's weights fails verification
    copy = tmp_path / s.bundle_dir.name
    shutil.copytree(s.bundle_dir, copy)
    weights = copy / Path(models[cands[-1].path]["weights"])
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=str(models[cands[-1].path]["weights"])):
        verify_bundle(copy, release_keys[1])


def test_a_candidate_failing_the_gate_is_left_out_with_the_reason(auto_build) -> None:
    _, s = auto_build
    left = {c["name"]: c for c in s.manifest["candidates_left_out"]}
    assert FAILED in left and "gate FAILED" in left[FAILED]["reason"] and not left[FAILED]["gate"]["passed"]
    assert left[FAILED]["inference_precision"] == "f32" and left[FAILED]["precision"] == "fp32"
    gate_step = next(st for st in s.steps if st.name == "gate")
    assert f"{FAILED} left out" in gate_step.detail


def _fake_timer(p50: dict[str, float]):
    timed = []

    def timer(name, run, x):
        run(x)  # the candidate really runs here
        timed.append(name)
        return p50[name]
    return timer, timed


def test_runtime_times_the_candidates_picks_the_fastest_and_records_it(auto_build, tmp_path: Path) -> None:
    _, s = auto_build
    names = [c.name for c in candidates_of(s.manifest)]
    choice_file = tmp_path / "precision.json"
    for fastest in (names[-1], names[0]):  # either order: not just the first or the last one listed
        p50 = {n: (1.0 if n == fastest else 5.0 + i) for i, n in enumerate(names)}
        timer, timed = _fake_timer(p50)
        choice_file.unlink(missing_ok=True)
        with load_bundle(s.bundle_dir, timer=timer, choice_file=choice_file) as rt:
            assert sorted(timed) == sorted(names)
            assert rt.candidate.name == fastest and rt.describe()["candidate"] == fastest
            assert "fastest on this CPU" in rt.choice.reason
            ok, why = rt.self_test()
            assert ok and f"candidate {fastest}" in why
        rec = json.loads(choice_file.read_text())
        assert rec["candidate"] == fastest and rec["timings_ms"] == p50 and rec["bundle"] == "classify-echocare-tiny-openvino-cpu-3"
    # a later load on this CPU reuses the record without timing
    timer, timed = _fake_timer({n: 1.0 for n in names})
    with load_bundle(s.bundle_dir, timer=timer, choice_file=choice_file) as rt:
        assert timed == [] and rt.candidate.name == names[0] and "recorded in" in rt.choice.reason


def test_the_cli_says_which_candidate_ran_and_why(auto_build, release_keys, busi_root, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from echofleet.cli.edge import edge_app

    _, s = auto_build
    image = next(p for p in sorted((busi_root / "benign").glob("*.png")) if "_mask" not in p.name)
    choice = ["--choice-file", str(tmp_path / "device" / "precision.json")]
    res = CliRunner().invoke(edge_app, ["infer", str(s.bundle_dir), str(image), "--pubkey", str(release_keys[1]), "--json", *choice])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)["bundle"]
    assert info["candidate"] in [c.name for c in candidates_of(s.manifest)] and "fastest" in info["choice"]["reason"]
    res = CliRunner().invoke(edge_app, ["infer", str(s.bundle_dir), str(image), "--pubkey", str(release_keys[1]), *choice])
    assert res.exit_code == 0 and f"precision candidate {info['candidate']}: fastest on this CPU" in res.output, res.output
    assert "recorded" in res.output  # the second run reused the first one's choice


def test_an_old_single_model_bundle_still_runs(auto_build, release_keys, tmp_path: Path) -> None:
    """A format /1 bundle (no candidates) as builds before issue 13 wrote it: verified, run, self-tested."""
    _, s = auto_build
    m = json.loads((s.bundle_dir / "manifest.json").read_text())
    int8 = next(c for c in m["candidates"] if c["name"] == "int8-f32")
    model = next(a for a in m["artifacts"] if a["path"] == int8["path"])
    old = {k: v for k, v in m.items() if k not in ("candidates", "candidates_left_out", "artifacts")}
    old.update(format=FORMAT, precision="int8", version="old")
    old["selftest"] = {**m["selftest"], "outputs": {"model/model.xml": m["selftest"]["outputs"]["int8-f32"]}}
    old["artifacts"] = [{"path": "model/model.xml", "role": "model", "format": "openvino-ir", "precision": "int8",
                         "inference_precision": "f32", "target": "openvino-cpu", "weights": "model/model.bin"},
                        {"path": "model/model.bin", "role": "weights", "precision": "int8", "target": "openvino-cpu"},
                        {"path": "selftest/input.npy", "role": "selftest"}]
    files = {"model/model.xml": s.bundle_dir / model["path"], "model/model.bin": s.bundle_dir / model["weights"],
             "selftest/input.npy": s.bundle_dir / "selftest/input.npy"}
    tarball = write_bundle(tmp_path, old, files, release_keys[0])
    with load_bundle(tarball, public_key=release_keys[1]) as rt:
        assert rt.candidate is None and rt.choice is None and rt.artifact["path"] == "model/model.xml"
        assert rt.self_test()[0] and "candidate" not in rt.describe()
    # a bundle of a format this runtime does not know is refused with the reason
    newer = {**old, "format": "echofleet-bundle/9", "version": "newer"}
    with pytest.raises(BundleError, match="newer than this runtime reads"):
        load_bundle(write_bundle(tmp_path, newer, files, release_keys[0]), public_key=release_keys[1])


def test_auto_is_refused_where_it_cannot_be_gated_per_candidate(tmp_path: Path, release_keys) -> None:
    with pytest.raises(ValueError, match="has no precision candidates"):
        build(tmp_path, "onnxruntime-cpu", "phantom:4", "phantom:4", release_keys[0], tmp_path / "o", config=BuildConfig(precision="auto"))
    with pytest.raises(ValueError, match="needs --val"):
        build(tmp_path, "openvino-cpu", "phantom:4", None, release_keys[0], tmp_path / "o", config=BuildConfig(precision="auto"),
              accept=lambda *_: [])
    with pytest.raises(ValueError, match="each candidate has its own inference precision"):
        build(tmp_path, "openvino-cpu", "phantom:4", "phantom:4", release_keys[0], tmp_path / "o",
              config=BuildConfig(precision="auto", inference_precision="bf16"))


def test_a_candidate_that_cannot_run_as_named_is_skipped(auto_build, monkeypatch) -> None:
    """A CPU without bf16 runs a bf16 candidate as f32: the runtime skips it and says why."""
    _, s = auto_build
    names = [c.name for c in candidates_of(s.manifest)]
    bf16 = [n for n in names if "bf16" in n]
    if not bf16:
        pytest.skip("no bf16 candidate shipped (this build machine has no bf16)")
    real = BundleRuntime._open_candidate

    def no_bf16(self, c, num_threads):
        sess, problem = real(self, c, num_threads)
        if c.inference_precision == "bf16":
            return None, "this CPU runs f32 when asked for bf16 (no such kernels here)"
        return sess, problem

    monkeypatch.setattr(BundleRuntime, "_open_candidate", no_bf16)
    timer, timed = _fake_timer({n: 1.0 for n in names})
    with load_bundle(s.bundle_dir, timer=timer) as rt:
        assert set(timed) == set(names) - set(bf16) and rt.candidate.inference_precision == "f32"
        assert set(rt.choice.skipped) == set(bf16) and "skipped" in rt.choice.reason


def test_build_summary_lists_every_candidate(auto_build) -> None:
    from rich.console import Console

    from edge.report import print_build

    _, s = auto_build
    console = Console(record=True, width=300)
    print_build(console, s)
    text = console.export_text()
    for c in s.candidates:
        assert c["name"] in text
    assert "left out: gate FAILED" in text
    d = s.to_dict()
    assert [c["name"] for c in d["candidates"]] == [c["name"] for c in s.candidates] and d["candidates_left_out"]


def test_cli_refuses_auto_where_it_does_not_apply(tmp_path: Path, release_keys) -> None:
    from typer.testing import CliRunner

    from echofleet.cli.edge import edge_app

    common = [str(tmp_path), "--key", str(release_keys[0]), "--out", str(tmp_path / "o"), "--precision", "auto", "--calib", "phantom:4"]
    res = CliRunner().invoke(edge_app, ["build", *common, "--target", "onnxruntime-cpu", "--val", "phantom:4"])
    assert res.exit_code == 2 and "--precision" in res.output and "auto" in res.output, res.output
    res = CliRunner().invoke(edge_app, ["build", *common, "--target", "openvino-cpu", "--accept", "sites"])
    assert res.exit_code == 2 and "--precision auto gates every candidate on --val" in res.output, res.output


def test_bench_times_each_candidate_and_names_the_runtimes_choice(auto_build, monkeypatch) -> None:
    from edge.bench import latency
    from edge.bench.latency import bench_bundle
    from edge.device import runtime

    _, s = auto_build
    monkeypatch.setattr(runtime, "time_p50_ms", lambda run, x, duration: (run(x), 1.0)[1])  # the load's choice: quick
    monkeypatch.setattr(latency, "torch_runner", lambda _m: (_ for _ in ()).throw(ImportError("no baseline here")))
    report = bench_bundle(s.bundle_dir, iters=2, warmup=1, batch=1, duration=0.0, with_peak=False, torch_model=None)
    names = [c["name"] for c in s.candidates]
    labels = [r.label for r in report.rows if r.backend == "openvino"]
    assert [lab.split(" ")[0] for lab in labels] == names
    assert any(n.startswith("the runtime runs precision candidate ") and "fastest on this CPU" in n for n in report.notes), report.notes


def test_the_performance_preset_is_a_file_of_its_own_gated_per_candidate(auto_build) -> None:
    """NNCF's PERFORMANCE preset (issue 13: the fastest INT8 on the AMX bench) is quantized beside the
    MIXED one from the same images, ships under model/int8-perf/ where a candidate on it passes the
    gate, and the manifest says how each shipped file was quantized."""
    _, s = auto_build
    m = s.manifest
    shipped = {c.name: c for c in candidates_of(m)}
    left = {c["name"]: c["reason"] for c in m["candidates_left_out"]}
    perf = ("int8-perf-f32", "int8-perf-bf16")
    assert all((n in shipped) != (n in left) for n in perf), (shipped, left)  # each either ships or says why not
    q = m["quantization_files"]
    assert q["int8"]["preset"] == "mixed" and q["int8"]["method"] == "nncf"
    assert m["quantization"] == q["int8"]  # what release_chain and `edge explain` show: a file the bundle has
    v = m["model_card"]["validation"]  # the FP32 reference stays apart from the candidate named fp32
    assert set(v["candidates"]) == set(shipped) and v["fp32"] == s.fp32_metrics
    if any(n in shipped for n in perf):
        assert q["int8-perf"]["preset"] == "performance"
        assert {shipped[n].path for n in perf if n in shipped} == {"model/int8-perf/model.xml"}
        digests = {a["path"]: a["sha256"] for a in m["artifacts"]}
        assert digests["model/int8-perf/model.bin"] != digests["model/int8/model.bin"]
    else:
        assert "int8-perf" not in q and all("gate" in left[n] or "runs" in left[n] for n in perf), left


def test_auto_variants_are_not_built_twice_nor_from_the_sites_ranges(tmp_path: Path) -> None:
    from edge.build.pipeline import federated_quantize_config, quantize_auto_files
    from edge.build.quantize import QuantizeConfig
    from edge.targets import get_target

    t = get_target("openvino-cpu")
    exported, quantized = tmp_path / "model.onnx", tmp_path / "q.xml"
    files, not_built, configs = quantize_auto_files(t, exported, quantized, federated_quantize_config(QuantizeConfig("nncf")),
                                                    None, tmp_path, federated=True)
    assert files == {"int8": quantized, "fp32": exported} and "sites' ranges" in not_built["int8-perf"]
    files, not_built, configs = quantize_auto_files(t, exported, quantized, QuantizeConfig("nncf", preset="performance"),
                                                    None, tmp_path, federated=False)
    assert "int8-perf" not in files and "already has" in not_built["int8-perf"] and configs["int8"]["preset"] == "performance"
    # the preset is NNCF's: a build quantizing with ONNX Runtime QDQ gets no second (identical) file
    files, not_built, configs = quantize_auto_files(t, exported, quantized, QuantizeConfig("qdq"), None, tmp_path, federated=False)
    assert set(files) == {"int8", "fp32"} and "NNCF setting" in not_built["int8-perf"] and "qdq" in not_built["int8-perf"]


def test_every_auto_candidate_runs_a_file_the_target_names() -> None:
    from edge.targets import EdgeTarget, get_target

    t = get_target("openvino-cpu")
    with pytest.raises(ValueError, match="int8-typo"):
        EdgeTarget(**{**{f: getattr(t, f) for f in t.__dataclass_fields__},
                      "auto_candidates": (*t.auto_candidates, ("x", "int8-typo", "f32"))})
