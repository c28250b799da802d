"""A site's compute device through the federation (issue 12), on CPU-only machines.

What runs here: the device a site's policy asks for (fallback, refusal at policy load and in
``echofleet simulate --device``), the feature precision decision and its cache keys, DP-SGD with a
``device`` argument, the device class in the reply and the run report, the pinned encoder sha256,
and the columns a ``pooling="last"`` head reads. No GPU is used: CUDA paths are exercised through
``torch.cuda`` monkeypatched to "no GPU", and the reduced-precision path through a CPU stand-in
(CPU bf16 autocast) that goes through the same code a GPU would.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from echocare.device import ComputeDevice
from fed import features
from fed.features import EncoderMismatch, EncoderRef, feature_precision, pooled_features, site_device, site_encoder_key
from fed.policy import PolicyError, SitePolicy, load_policy, write_policy

TINY = "echocare-tiny"
PHANTOMS = "phantom:4?seed=5"
NO_GPU = ("no NVIDIA GPU", "no CUDA support")  # the reason on a CUDA build without a GPU, or a CPU-only build
BF16_ON_CPU = ComputeDevice("cpu", "cpu", "cpu", "bfloat16", "test stand-in: CPU with bf16 autocast")


@pytest.fixture()
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    site_device.cache_clear()
    yield
    site_device.cache_clear()


@pytest.fixture(scope="module")
def phantoms():
    from echocare.data import open_data

    return open_data(PHANTOMS)


# -- which device, and when a site fails ------------------------------------------------------------
def test_auto_falls_back_to_the_cpu_and_says_so_once(no_gpu, caplog):
    with caplog.at_level(logging.INFO, logger="fed.features"):
        first, again = site_device("auto"), site_device("auto")
    assert first is again and first.torch_device == "cpu" and first.device_class == "cpu" and first.fell_back
    said = [r for r in caplog.records if "using the CPU" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING


def test_explicit_cuda_without_a_gpu_fails_at_policy_load(no_gpu, tmp_path):
    path = write_policy(SitePolicy(data=PHANTOMS, device="cuda:0"), tmp_path / "policy.toml")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(path) in str(e.value) and "device" in str(e.value) and any(r in str(e.value) for r in NO_GPU)
    # auto and cpu load on the same machine
    for ok in ("auto", "cpu"):
        assert load_policy(write_policy(SitePolicy(data=PHANTOMS, device=ok), tmp_path / f"{ok}.toml")).device == ok


def test_a_malformed_device_is_refused_with_the_choices(tmp_path):
    with pytest.raises(PolicyError, match="expected one of auto, cpu, cuda, cuda:N"):
        SitePolicy(data=PHANTOMS, device="gpu")
    (tmp_path / "p.toml").write_text(f'data = "{PHANTOMS}"\ndevice = "cpu:1"\n')
    with pytest.raises(PolicyError, match=r"p\.toml.*cpu:1"):
        load_policy(tmp_path / "p.toml")


def test_simulate_device_is_checked_before_any_work(no_gpu, tmp_path):
    from echofleet.simulation import SimulationConfig, SimulationConfigError, check, layout_sites

    with pytest.raises(SimulationConfigError) as e:
        check(SimulationConfig(data=PHANTOMS, out=str(tmp_path / "a"), device="cuda"))
    assert e.value.field == "device" and any(r in e.value.problem for r in NO_GPU)
    with pytest.raises(SimulationConfigError, match="expected one of"):
        check(SimulationConfig(data=PHANTOMS, out=str(tmp_path / "b"), device="tpu"))
    cfg = SimulationConfig(data=PHANTOMS, sites=2, out=str(tmp_path / "c"), device="cpu")
    check(cfg)
    sites = layout_sites(cfg, tmp_path / "c")
    assert {load_policy(sites / f"site-{k}" / "policy.toml").device for k in range(2)} == {"cpu"}


def test_simulate_cli_device_option(no_gpu, tmp_path):
    from typer.testing import CliRunner

    from echofleet.cli import app

    res = CliRunner().invoke(app, ["simulate", "--data", PHANTOMS, "--out", str(tmp_path / "r"), "--device", "cuda:1"])
    assert res.exit_code == 2, res.output
    assert "--device" in res.output and any(r in res.output for r in NO_GPU)


# -- the precision of cached features ----------------------------------------------------------------
def test_reduced_precision_is_used_only_when_it_agrees_and_has_its_own_cache(phantoms, tmp_path):
    ref = EncoderRef(TINY)
    fp32, _ = pooled_features(phantoms, ref, phantoms_spec(), tmp_path)
    # a stand-in that always agrees: bf16 features, in their own cache next to the fp32 one
    bf16, _ = pooled_features(phantoms, ref, phantoms_spec(), tmp_path, device=BF16_ON_CPU, min_cosine=-1.0,
                               probe_images=2)
    keys = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert len(keys) == 2 and any(k.endswith("-pooled") for k in keys) and any(k.endswith("-pooled-bfloat16") for k in keys)
    assert not np.array_equal(fp32, bf16)  # truly different numbers, not a copy of the fp32 cache
    record = features.feature_precision(BF16_ON_CPU, ref, phantoms_spec(), [], tmp_path)[1]
    assert record == {}  # no probe images, no decision
    [json_file] = tmp_path.glob("precision-*-bfloat16.json")
    import json

    got = json.loads(json_file.read_text())
    assert got["use_autocast"] is True and 0.0 < got["min_cosine"] <= got["mean_cosine"] <= 1.0 + 1e-9


def test_reduced_precision_that_disagrees_falls_back_to_fp32(phantoms, tmp_path):
    ref = EncoderRef(TINY)
    images = [s.image() for s in phantoms.samples[:2]]
    chosen, record = feature_precision(BF16_ON_CPU, ref, phantoms_spec(), images, tmp_path, min_cosine=1.5)
    assert chosen.autocast is None and record["use_autocast"] is False and record["min_cosine"] < 1.5
    # the decision is remembered: a later call reads it instead of probing again
    chosen2, record2 = feature_precision(BF16_ON_CPU, ref, phantoms_spec(), images, tmp_path, min_cosine=1.5)
    assert chosen2.autocast is None and record2 == record
    x, _ = pooled_features(phantoms, ref, phantoms_spec(), tmp_path, device=BF16_ON_CPU, min_cosine=1.5, probe_images=2)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()][0].endswith("-pooled")  # the fp32 cache only
    assert x.shape[0] == len(phantoms.samples)


def phantoms_spec():
    from echocare.preprocess import PreprocessSpec

    return PreprocessSpec()


# -- DP-SGD on the chosen device ---------------------------------------------------------------------
def test_dp_step_runs_on_the_device_it_is_given():
    from fed.dp import DPConfig, DPRandom, train_head

    # noise and batch indices are drawn on the CPU (OS entropy) and handed over on the requested
    # device: "meta" stands in for a GPU (a device that is not the CPU, available everywhere)
    rng = DPRandom(device="meta")
    assert rng.private and rng.gaussian(1.0, (3, 2)).device.type == "meta"
    assert rng.poisson_batch(50, 0.5).device.type == "meta"

    class Spy(torch.nn.Sequential):  # records where train_head moves the head
        moved_to: list = []

        def to(self, *args, **kwargs):
            Spy.moved_to.append(args[0] if args else kwargs.get("device"))
            return super().to(*args, **kwargs)

    torch.manual_seed(0)
    x, y = torch.randn(40, 8), torch.randint(0, 3, (40,))
    for fast in (True, False):  # closed-form linear path and Opacus' path
        Spy.moved_to.clear()
        head = Spy(torch.nn.Linear(8, 3))
        before = head[0].weight.detach().clone()
        stats = train_head(head, x, y, DPConfig(epochs=1, batch_size=10, noise_multiplier=1.0, device="cpu",
                                               fast_linear=fast))
        assert Spy.moved_to == [torch.device("cpu")]
        assert stats["steps"] == 4 and stats["private"] and head[0].weight.device.type == "cpu"
        assert not torch.equal(before, head[0].weight)


# -- what the coordinator learns: the device class -----------------------------------------------------
def test_reply_and_report_carry_the_device_class():
    from fed.client_app import to_content
    from fed.task import Reply
    from server.coordinator.report import build_report, model_card
    from server.coordinator.strategy import RoundLog, site_device as reply_device

    content = to_content(Reply("ok", "site-a", 1, None, {"epsilon": 1.0, "delta": 1e-5}), "cuda:H200")
    assert content["site"]["device"] == "cuda:H200"
    assert reply_device(SimpleNamespace(content=content)) == {"device": "cuda:H200"}
    assert reply_device(SimpleNamespace(content=to_content(Reply("ok", "site-b", 1)))) == {}
    rl = RoundLog(train={"site-a": {"epsilon": 1.0, "delta": 1e-5, "status": "ok", "device": "cuda:H200"},
                         "site-b": {"epsilon": 1.0, "delta": 1e-5, "status": "ok", "device": "cpu"}})
    report = build_report({"task": "classify", "labels": ["a", "b"], "strategy": "fedavg", "rounds_completed": 1,
                           "num_rounds": 1, "encoder": {"config": TINY, "seed": 0}, "dp": {"target_epsilon": 8.0, "max_grad_norm": 1.0}},
                          {1: rl.__dict__})
    assert report["site_devices"] == {"site-a": "cuda:H200", "site-b": "cpu"}
    assert report["rounds"][0]["sites"]["site-a"]["device"] == "cuda:H200"
    assert "device" not in report["rounds"][0]["sites"]["site-a"]["train"]
    assert "site-a cuda:H200, site-b cpu" in model_card(report)


# -- every site proves it loaded the same encoder file -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[str, str]:
    from echocare.models.encoder import build_encoder, sha256_file

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build_encoder(TINY, seed=3).state_dict(), path)
    return str(path), sha256_file(path)


def test_coordinator_pins_the_checkpoint_sha256(tiny_checkpoint, tmp_path):
    from server.coordinator.server_app import pinned_encoder

    path, sha = tiny_checkpoint
    assert pinned_encoder(EncoderRef(TINY, path)).sha256 == sha
    assert pinned_encoder(EncoderRef(TINY)).sha256 is None  # random init: nothing to pin
    with pytest.raises(RuntimeError, match=f"encoder-sha256 {'0' * 64} differs from the sha256 {sha}"):
        pinned_encoder(EncoderRef(TINY, path, "0" * 64))
    with pytest.raises(RuntimeError, match="set encoder-sha256"):
        pinned_encoder(EncoderRef(TINY, str(tmp_path / "absent.pth")))


def test_a_site_with_another_file_refuses_naming_both_hashes(tiny_checkpoint, tmp_path):
    from fed.task import RoundConfig, round_head, train_round

    path, sha = tiny_checkpoint
    wrong = "ab" * 32
    with pytest.raises(EncoderMismatch) as e:
        site_encoder_key(EncoderRef(TINY, path, wrong))
    assert sha not in e.value.public_reason and wrong in e.value.public_reason and path not in e.value.public_reason  # site hash: log only
    assert site_encoder_key(EncoderRef(TINY, path, sha)) == f"{TINY}-{sha[:16]}"
    cfg = RoundConfig(encoder=EncoderRef(TINY, path, wrong), labels=["benign", "malignant", "normal"], head={},
                      noise_multiplier=1.0, run_key="pin")
    weights = {k: v.detach().numpy().copy() for k, v in round_head(cfg).state_dict().items()}
    policy = SitePolicy(data=PHANTOMS, site_name="h", state_dir=str(tmp_path / "s"), device="cpu",
                        encoder_checkpoint=path)  # the site's own copy (it opens no other checkpoint)
    reply = train_round(policy, cfg, weights)
    assert reply.status == "refused" and sha not in reply.reason and wrong in reply.reason and path not in reply.reason
    # load_encoder itself refuses a file whose hash differs from the pinned one
    features._encoder.cache_clear()
    from echocare.models.encoder import CheckpointError

    with pytest.raises(CheckpointError, match=f"sha256 {sha} differs from the expected {wrong}"):
        features._encoder(EncoderRef(TINY, path, wrong))


def test_a_site_uses_its_own_checkpoint_whatever_path_the_run_names(tiny_checkpoint, tmp_path):
    """The site opens only the file its policy pins (``encoder_checkpoint``), checked against the run's
    sha256; the run's path is ignored. ``echofleet simulate --checkpoint`` writes that field into every
    virtual hospital's policy, as a hospital's IT would install the released weights."""
    from echofleet.simulation import SimulationConfig, _site_policy
    from fed.task import site_encoder

    path, sha = tiny_checkpoint
    policy = SitePolicy(data=PHANTOMS, state_dir=str(tmp_path / "s"), encoder_checkpoint=path)
    ref = site_encoder(policy, EncoderRef(TINY, "/srv/coordinator/elsewhere.pth", sha, 3))
    assert ref == EncoderRef(TINY, path, sha, 3) and site_encoder_key(ref) == f"{TINY}-{sha[:16]}"
    assert site_encoder(policy, EncoderRef(TINY, None, None, 3)) == EncoderRef(TINY, None, None, 3)  # random init
    with pytest.raises(EncoderMismatch):  # a run naming a checkpoint at a site that has none
        site_encoder(replace(policy, encoder_checkpoint=""), EncoderRef(TINY, path, sha))
    simulated = _site_policy(SimulationConfig(checkpoint=path), tmp_path / "sites", 0)
    assert simulated.encoder_checkpoint == path
    assert _site_policy(SimulationConfig(), tmp_path / "sites", 0).encoder_checkpoint == ""


# -- pooling="last": the right columns, for the site and for the public projection ----------------------
def test_last_stage_pooling_reads_the_last_maps_columns(phantoms, tmp_path):
    from echocare.models.encoder import get_config, pooled_columns
    from fed.features import public_projection, select_pooled
    from fed.task import RoundConfig, site_features

    last = get_config(TINY).feature_channels[-1]
    every, _ = pooled_features(phantoms, EncoderRef(TINY), phantoms_spec(), tmp_path)
    assert np.array_equal(select_pooled(every, TINY, (4,)), every[:, pooled_columns(TINY, (4,))])
    assert select_pooled(every, TINY, None) is every
    policy = SitePolicy(data=PHANTOMS, site_name="h", state_dir=str(tmp_path / "s"), cache_dir=str(tmp_path), device="cpu")
    cfg = RoundConfig(labels=["phantom"], head={"pooling": "last"})
    labels = sorted({s.label for s in phantoms.samples})
    x, _ = site_features(policy, replace(cfg, labels=labels), "train")
    assert x.shape[1] == last
    x_all, _ = site_features(policy, replace(cfg, labels=labels, head={}), "train")
    assert x_all.shape[1] == every.shape[1]
    mean, matrix = public_projection(EncoderRef(TINY), phantoms_spec(), 3, tmp_path, PHANTOMS, (4,))
    assert mean.shape == (last,) and matrix.shape == (last, 3)
