"""Encoder configs, the official architecture, strict checkpoint loading, the inspect CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from echocare.models.encoder import (
    ENCODER_CONFIGS,
    OFFICIAL_LAYOUT_FILE,
    CheckpointError,
    build_encoder,
    check_state_dict,
    checkpoint_sha256,
    count_params,
    encode,
    get_config,
    is_released_layout,
    layout_of,
    load_encoder,
    load_state_dict_strict,
    measure_forward,
    official_layout,
    pooled_columns,
    pooled_features,
    pooling_stages,
    preprocess_spec,
    sha256_file,
)

TINY = "echocare-tiny"


def _official_layout(config: str, seed: int) -> dict[str, torch.Tensor]:
    """A state dict as the EchoCare release stores it: MONAI keys, no prefix, plus ``mask_token``."""
    sd = build_encoder(config, seed=seed).state_dict()
    sd["mask_token"] = torch.randn(1, 1, get_config(config).embed_dim)
    return sd


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    sd = _official_layout(TINY, seed=7)
    path = tmp_path_factory.mktemp("ckpt") / "echocare_encoder.pth"
    torch.save(sd, path)
    return str(path), sd


def _same_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_config_table():
    assert set(ENCODER_CONFIGS) >= {"echocare", "echocare-small", "echocare-tiny"}
    cfg = get_config("echocare")
    assert (cfg.embed_dim, cfg.depths, cfg.num_heads, cfg.window_size, cfg.patch_size) == (128, (2, 2, 18, 2), (4, 8, 16, 32), (8, 8), (2, 2))
    assert cfg.feature_channels == (128, 256, 512, 1024, 2048)
    assert cfg.feature_strides == (2, 4, 8, 16, 32)
    assert get_config(cfg) is cfg
    with pytest.raises(ValueError, match="echocare-tiny"):
        get_config("echocare-huge")


def test_official_config_params_flops_shapes_and_checkpoint_layout():
    """The released architecture, built from MONAI: ~120.2 M params, ~202 GFLOP, five maps.

    Also checks that a state dict in the release layout (plain MONAI keys + ``mask_token``)
    loads strictly, and that a checkpoint of another config is refused with its shapes.
    """
    enc = build_encoder("echocare", seed=0).eval()
    assert round(count_params(enc) / 1e6, 1) == 120.2
    gflops, shapes = measure_forward(enc, "echocare")
    assert shapes == [(1, 128, 128, 128), (1, 256, 64, 64), (1, 512, 32, 32), (1, 1024, 16, 16), (1, 2048, 8, 8)]
    assert 195 < gflops < 210, gflops

    # MONAI's construction today is the stored layout of the released file, key for key, in order:
    # a MONAI release that renames, adds, drops or reshapes a key fails here, not at a hospital.
    built, stored = layout_of(enc), official_layout()
    assert len(stored) == 358 and json.loads(OFFICIAL_LAYOUT_FILE.read_text())["num_keys"] == 358
    diff = [f"{k}: built {built.get(k)} vs stored {stored.get(k)}" for k in dict.fromkeys([*built, *stored]) if built.get(k) != stored.get(k)]
    assert not diff, f"MONAI's SwinTransformer no longer matches the released EchoCare layout ({len(diff)} keys): {diff[:5]}"
    assert list(built) == list(stored)

    sd = enc.state_dict()
    # v2 stage-wise residual conv blocks and 18 blocks in stage 3: the EchoCare (SwinUNETR-v2) layout
    assert "layers1c.0.layer.conv1.conv.weight" in sd and "layers3.0.blocks.17.attn.qkv.weight" in sd
    sd["mask_token"] = torch.zeros(1, 1, 128)
    load_state_dict_strict(enc, "echocare", sd, source="release-layout")

    with pytest.raises(CheckpointError) as err:
        load_state_dict_strict(enc, "echocare", _official_layout(TINY, seed=0), source="tiny.pth")
    msg = str(err.value)
    assert "tiny.pth does not match config echocare" in msg
    assert "patch_embed.proj.weight [24,3,2,2] vs [128,3,2,2]" in msg
    assert "looks like config 'echocare-tiny'" in msg


def test_seeded_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_encoder(TINY, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_encoder(TINY, seed=0)
    c = build_encoder(TINY, seed=1)
    assert _same_weights(a, b.state_dict())
    assert not _same_weights(a, c.state_dict())


def test_release_layout_checkpoint_loads_strictly(tiny_ckpt):
    path, sd = tiny_ckpt
    enc, sha = load_encoder(TINY, path, seed=0)  # seed 0 init differs from the seed-7 weights in the file
    assert sha == hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256_file(path)
    sd = {k: v for k, v in sd.items() if k != "mask_token"}
    assert _same_weights(enc, sd)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


def test_no_checkpoint_gives_frozen_seeded_encoder():
    enc, sha = load_encoder(TINY, None, seed=3)
    assert sha is None and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert _same_weights(enc, build_encoder(TINY, seed=3).state_dict())


def test_safetensors_accepted(tiny_ckpt, tmp_path):
    from safetensors.torch import save_file

    _, sd = tiny_ckpt
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    enc, sha = load_encoder(TINY, path)
    assert sha == sha256_file(path)
    assert _same_weights(enc, sd)


def test_truncated_file_is_refused_naming_it(tiny_ckpt, tmp_path):
    data = open(tiny_ckpt[0], "rb").read()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth: cannot read checkpoint"):
        load_encoder(TINY, bad)
    bad_st = tmp_path / "truncated.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="truncated.safetensors: cannot read checkpoint"):
        load_encoder(TINY, bad_st)


def test_renamed_key_is_refused_with_the_mismatch(tiny_ckpt, tmp_path):
    _, sd = tiny_ckpt
    sd = dict(sd)
    sd["layers1.0.blocks.0.attn.qkv.weightX"] = sd.pop("layers1.0.blocks.0.attn.qkv.weight")
    path = tmp_path / "renamed.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_encoder(TINY, path)
    msg = str(err.value)
    assert f"{path} does not match config echocare-tiny" in msg
    assert "missing 1 keys (layers1.0.blocks.0.attn.qkv.weight)" in msg
    assert "unexpected 1 (layers1.0.blocks.0.attn.qkv.weightX)" in msg


def test_wrong_config_is_refused(tiny_ckpt):
    with pytest.raises(CheckpointError, match=r"config echocare-small: .*shape mismatch patch_embed\.proj\.weight \[24,3,2,2\] vs \[96,3,2,2\]"):
        load_encoder("echocare-small", tiny_ckpt[0])


def test_wrapper_and_prefix_are_stripped_and_logged(tiny_ckpt, tmp_path, caplog):
    _, sd = tiny_ckpt
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    with caplog.at_level(logging.INFO, logger="echocare.models.encoder"):
        enc, _ = load_encoder(TINY, path)
    assert _same_weights(enc, sd)
    text = caplog.text
    assert "'state_dict' key" in text and "stripped the prefix 'module.'" in text and "dropped 'mask_token'" in text


def test_prefix_on_only_some_keys_is_refused(tiny_ckpt, tmp_path):
    _, sd = tiny_ckpt
    mixed = {(f"encoder.{k}" if k.startswith("layers1") else k): v for k, v in sd.items()}
    path = tmp_path / "mixed.pth"
    torch.save(mixed, path)
    with pytest.raises(CheckpointError, match="unexpected .*encoder.layers1"):
        load_encoder(TINY, path)


def test_missing_and_hf_uncached_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pth: checkpoint file not found"):
        load_encoder(TINY, tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="download"):
        load_encoder(TINY, "hf://echofleet-test/not-a-repo/echocare_encoder.pth")
    with pytest.raises(CheckpointError, match="sha256 .* differs"):
        torch.save(_official_layout(TINY, 0), tmp_path / "x.pth")
        load_encoder(TINY, tmp_path / "x.pth", expected_sha256="0" * 64)


def test_encode_and_pooled_features():
    enc, _ = load_encoder(TINY)
    cfg = get_config(TINY)
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        maps = encode(enc, x)
    assert [tuple(m.shape[1:]) for m in maps] == cfg.feature_shapes()
    pooled = pooled_features(maps)
    assert pooled.shape == (2, sum(cfg.feature_channels))
    assert torch.allclose(pooled[:, : cfg.feature_channels[0]], maps[0].mean(dim=(2, 3)))
    assert pooled_features(maps, stages=[3, 4]).shape == (2, cfg.feature_channels[3] + cfg.feature_channels[4])
    with pytest.raises(ValueError, match="multiples of 32"):
        encode(enc, torch.zeros(1, 3, 100, 100))


def test_encoder_module_is_torch_free_to_import():
    code = "import sys; sys.modules['torch'] = None; import echocare.models.encoder as e, echofleet.cli.model; print(e.get_config('echocare').feature_channels)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "(128, 256, 512, 1024, 2048)" in out.stdout


def test_cli_inspect_and_list(tiny_ckpt):
    from echofleet.cli.model import model_app

    runner = CliRunner()
    res = runner.invoke(model_app, ["inspect", "--config", TINY, "--checkpoint", tiny_ckpt[0], "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(report) == {"config", "params", "sha256", "gflops", "output_shapes", "preprocess"}
    assert report["preprocess"] == preprocess_spec(TINY).to_dict()
    assert report["preprocess"]["mean"] == [0.0, 0.0, 0.0] and report["preprocess"]["std"] == [1.0, 1.0, 1.0]
    assert report["config"] == TINY and report["sha256"] == sha256_file(tiny_ckpt[0])
    assert report["params"] == count_params(build_encoder(TINY))
    assert report["output_shapes"] == [[1, c, h, w] for c, h, w in get_config(TINY).feature_shapes()]
    assert 0 < report["gflops"] < 10

    res = runner.invoke(model_app, ["inspect", "--config", "echocare-small", "--checkpoint", tiny_ckpt[0]])
    assert res.exit_code == 2 and "does not match config echocare-small" in " ".join(res.output.split())

    res = runner.invoke(model_app, ["list"])
    assert res.exit_code == 0 and all(name in res.output for name in ENCODER_CONFIGS)


# ----------------------------------------------------------------------------- the released file


def _official_shapes(mismatch: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict with the released file's keys and shapes, on the meta device (no memory),
    plus ``mask_token``; ``mismatch`` names one key given a wrong shape."""
    sd = {k: torch.empty(shape, device="meta") for k, shape in official_layout().items()}
    if mismatch:
        sd[mismatch] = torch.empty(7, device="meta")
    sd["mask_token"] = torch.empty(1, 1, 128, device="meta")
    return sd


def test_stored_layout_of_the_released_file():
    layout = official_layout()
    assert len(layout) == 358 and layout["patch_embed.proj.weight"] == (128, 3, 2, 2)
    assert sum(1 for k in layout if k.startswith("layers3.0.blocks.") and k.endswith(".attn.qkv.weight")) == 18
    assert "mask_token" not in layout  # pretraining-only, dropped before the strict load
    assert is_released_layout({k: None for k in layout})
    assert not is_released_layout({k: None for k in layout_of(TINY)})


def test_released_file_into_small_or_tiny_is_refused_with_the_reason():
    for name in ("echocare-small", TINY):
        with pytest.raises(CheckpointError) as err:
            load_state_dict_strict(build_encoder(name), name, _official_shapes(), source="echocare_encoder.pth")
        msg = str(err.value)
        assert "echocare_encoder.pth is the released EchoCare encoder (config 'echocare', 358 keys)" in msg
        assert f"config {name} has no released weights" in msg and "use --config echocare" in msg


def test_released_layout_with_one_wrong_shape_names_it():
    """Into ``echocare`` itself the official shapes pass the check; one wrong shape is named."""
    cfg = get_config("echocare")

    class Shapes(torch.nn.Module):  # the check only needs the model's state-dict shapes
        def state_dict(self):
            return {k: torch.empty(s, device="meta") for k, s in official_layout().items()}

    sd = {k: v for k, v in _official_shapes().items() if k != "mask_token"}
    check_state_dict(cfg, Shapes(), sd, "ok.pth")  # no error
    bad = {k: v for k, v in _official_shapes("layers3.0.blocks.5.mlp.linear1.weight").items() if k != "mask_token"}
    with pytest.raises(CheckpointError, match=r"bad.pth does not match config echocare: shape mismatch layers3.0.blocks.5.mlp.linear1.weight \[7\] vs \[2048,512\]"):
        check_state_dict(cfg, Shapes(), bad, "bad.pth")


def test_cli_refuses_a_released_layout_file_for_small(tmp_path):
    """A tiny fake on disk with the released file's 358 key names (and mask_token)."""
    from echofleet.cli.model import model_app

    fake = {k: torch.zeros(1) for k in official_layout()}
    fake["mask_token"] = torch.zeros(1, 1, 128)
    path = tmp_path / "echocare_encoder.pth"
    torch.save(fake, path)
    res = CliRunner().invoke(model_app, ["inspect", "--config", "echocare-small", "--checkpoint", str(path), "--json"])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "is the released EchoCare encoder" in text and "use --config echocare" in text


def test_checkpoint_sha256_is_pinned_once_per_file_version(tiny_ckpt, tmp_path, monkeypatch):
    import echocare.models.encoder as encoder_module

    path = tmp_path / "copy.pth"
    path.write_bytes(open(tiny_ckpt[0], "rb").read())
    calls = []
    real = encoder_module.sha256_file
    monkeypatch.setattr(encoder_module, "sha256_file", lambda p: calls.append(p) or real(p))
    first = checkpoint_sha256(path)
    assert first == real(tiny_ckpt[0]) and checkpoint_sha256(str(path)) == first and len(calls) == 1
    path.write_bytes(path.read_bytes() + b"\0")  # a changed file is hashed again
    assert checkpoint_sha256(path) != first and len(calls) == 2
    # the pinned digest is what every site checks at load time
    with pytest.raises(CheckpointError, match="differs from the expected"):
        load_encoder(TINY, path, expected_sha256=first)
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        checkpoint_sha256(tmp_path / "missing.pth")


# ----------------------------------------------------------------------------- input and pooling


def test_every_config_uses_echocare_input():
    for name, cfg in ENCODER_CONFIGS.items():
        spec = preprocess_spec(name)
        assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0) and spec.size == cfg.img_size and spec.version == 2


def test_pooled_columns_select_stages_from_the_all_five_vector():
    enc, _ = load_encoder(TINY)
    with torch.no_grad():
        maps = encode(enc, torch.randn(2, 3, 64, 64))
    every = pooled_features(maps)
    for stages in ([4], [3, 4], [0, 2], None):
        assert torch.equal(every[:, pooled_columns(TINY, stages)], pooled_features(maps, stages))
    assert pooling_stages("last") == (4,) and pooling_stages("all") is None
    assert pooled_columns(TINY, pooling_stages("last")) == list(range(sum(get_config(TINY).feature_channels[:4]), 24 * 31))
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pooling_stages("max")
    with pytest.raises(ValueError, match="stage 5 out of range"):
        pooled_columns(TINY, [5])
