"""``site check`` finds planted problems and exits non-zero exactly when it should."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from echofleet.cli import app
from echocare.data import open_data
from echocare.data.sitecheck import check_site
from echocare.phantom import write_phantoms

runner = CliRunner()


@pytest.fixture()
def broken_site(tmp_path):
    """A phantom site with a truncated PNG, random bytes named .png, an empty class, a wrong-size mask."""
    root = tmp_path / "site"
    write_phantoms(root, 12, "linear-a,convex-b", seed=0)
    benign = sorted((root / "benign").glob("phantom-*[0-9].png"))
    good = benign[0].read_bytes()
    (root / "benign" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "malignant" / "random.png").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "cystic").mkdir()  # a class with no images
    wrong = benign[1].with_name(benign[1].stem + "_mask.png")
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(wrong)  # image is 256 x 256
    return root, benign[1]


def test_report_finds_every_planted_problem(broken_site):
    root, mismatched = broken_site
    report = check_site(open_data(f"folder:{root}"))
    assert report.listed == 14 and report.readable == 12
    reasons = {p.path.split("/")[-1]: p.reason for p in report.problems}
    assert set(reasons) == {"truncated.png", "random.png"}
    assert reasons["truncated.png"].startswith("cannot decode")
    assert reasons["random.png"] == "not a recognised image file"
    assert report.per_class == {"benign": 4, "cystic": 0, "malignant": 4, "normal": 4}
    h, w = np.asarray(Image.open(mismatched)).shape
    assert report.mask_mismatches == [{"key": f"benign/{mismatched.name}", "image": [h, w], "mask": [100, 100]}]
    assert not report.ok
    assert any("class 'cystic' has no readable images" in b for b in report.blocking)
    assert any("1 mask(s) differ in size" in b for b in report.blocking)
    assert report.sizes["height"] == {"min": 256, "median": 256.0, "max": 256}
    # masks: 8 lesion images, one of which has the wrong-size mask (not counted as a usable mask)
    assert report.masks["with_mask"] == 12 and report.masks["non_empty"] == 7
    assert 0.001 < report.masks["mean_lesion_fraction"] < 0.2


def test_cli_exits_non_zero_and_writes_json(broken_site, tmp_path):
    root, _ = broken_site
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["site", "check", f"folder:{root}", "--json", str(out)], env={"COLUMNS": "300"})
    assert result.exit_code == 1, result.output
    assert "blocking" in result.output and "cystic" in result.output and "truncated.png" in result.output
    report = json.loads(out.read_text())
    assert report["ok"] is False and len(report["problems"]) == 2 and report["per_split"]["train"]["benign"] >= 3


def test_clean_site_passes_with_split_counts(tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["site", "check", "phantom:30?profiles=linear-c", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ok"] and report["readable"] == 30 and report["blocking"] == []
    assert report["per_split"] == {"train": {"benign": 8, "malignant": 8, "normal": 8}, "val": {"benign": 2, "malignant": 2, "normal": 2}}
    assert report["masks"]["non_empty"] == 20 and report["masks"]["coverage"] == pytest.approx(20 / 30)


def test_duplicates_are_reported(tmp_path):
    root = tmp_path / "site"
    write_phantoms(root, 9, "linear-a", seed=1)
    src = root / "normal" / "phantom-linear-a-00008.png"
    (root / "normal" / "again.png").write_bytes(src.read_bytes())
    img = np.asarray(Image.open(src)).astype(np.int16)
    Image.fromarray(np.clip(img + 12, 0, 255).astype(np.uint8)).save(root / "benign" / "brighter.png")
    report = check_site(open_data(f"folder:{root}"))
    assert report.exact_duplicates == [["normal/again.png", "normal/phantom-linear-a-00008.png"]]
    assert report.near_duplicate_groups == [["benign/brighter.png", "normal/again.png", "normal/phantom-linear-a-00008.png"]]
    assert report.cross_label_groups == report.near_duplicate_groups  # benign copy of a normal image
    assert report.ok and any("different labels" in w for w in report.warnings)


def test_no_readable_images_and_a_class_emptied_by_corruption_block(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not a png")
    report = check_site(open_data(f"folder:{tmp_path}"))
    assert report.readable == 0 and "no readable images (1 listed)" in report.blocking
    assert "class 'a' has no readable images" in report.blocking


def test_bad_spec_exits_2():
    result = runner.invoke(app, ["site", "check", "busi:/definitely/not/here"])
    assert result.exit_code == 2 and "path not found" in result.output


def test_real_busi_subset_passes(busi_root):
    result = runner.invoke(app, ["site", "check", f"busi:{busi_root}?limit=45"])
    assert result.exit_code == 0, result.output
    assert "benign" in result.output and "no blocking problems" in result.output


# -- the compute device: what site check says about feature extraction (CPU paths; no GPU in CI) ----


def test_policy_on_cpu_reports_fp32_and_no_probe(tmp_path):
    policy = tmp_path / "site.toml"
    policy.write_text('data = "phantom:12?profiles=linear-a"\ndevice = "cpu"\n')
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["site", "check", str(policy), "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "cpu, fp32, no autocast" in result.output and "device cpu: as configured" in result.output
    report = json.loads(out.read_text())
    assert report["readable"] == 12  # the policy's data spec was read
    assert report["device"]["device_class"] == "cpu" and report["device"]["features"] == "fp32"
    assert report["device"]["autocast"] is None and report["device"]["probe"] is None


def test_cpu_bf16_autocast_probe_prints_the_cosine(tmp_path):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["site", "check", "phantom:12?profiles=linear-a", "--device", "cpu", "--precision", "bf16",
                                 "--probe-images", "2", "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    dev = json.loads(out.read_text())["device"]
    probe = dev["probe"]
    assert probe["probe_images"] == 2 and probe["autocast"] == "bfloat16" and probe["required_min_cosine"] == 0.995
    assert 0.995 <= probe["min_cosine"] <= probe["mean_cosine"] <= 1.0 + 1e-9 and probe["use_autocast"]
    assert dev["features"] == "bfloat16" and "autocast kept" in dev["decision"]
    assert f"min {probe['min_cosine']:.5f}, mean {probe['mean_cosine']:.5f} over 2 probe images" in result.output


def test_unfaithful_autocast_is_refused_and_reported(tmp_path, monkeypatch):
    """Autocast features whose cosine to fp32 is 0.96 on one probe image (1.0 on the other): fp32."""
    import fed.features

    def run_frozen(module, x, device, batch_size, fn):
        out = np.ones((len(x), 4), np.float32)
        if device.autocast:
            out[0] = [1.0, 1.0, 1.0, 0.5]  # cosine to (1, 1, 1, 1): 3.5 / (2 * sqrt(3.25)) = 0.9707
        return out

    monkeypatch.setattr(fed.features, "run_frozen", run_frozen)
    monkeypatch.setattr(fed.features, "_encoder", lambda ref, torch_device="cpu": None)
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["site", "check", "phantom:12?profiles=linear-a", "--device", "cpu", "--precision", "bf16",
                                 "--probe-images", "2", "--json", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    dev = json.loads(out.read_text())["device"]
    assert dev["features"] == "fp32" and "autocast refused" in dev["decision"] and not dev["probe"]["use_autocast"]
    assert dev["probe"]["min_cosine"] == pytest.approx(3.5 / (2 * 3.25**0.5))
    assert "min 0.97073, mean 0.98536 over 2 probe images" in result.output


@pytest.mark.parametrize("args, message", [
    (["--device", "cpu", "--precision", "fp16"], "fp16 autocast needs a GPU"),
    (["--device", "gpu"], "expected one of auto, cpu, cuda, cuda:N"),
    (["--encoder", "resnet"], "--encoder resnet: must be one of"),
])
def test_bad_device_arguments_exit_2_before_reading(args, message):
    result = runner.invoke(app, ["site", "check", "phantom:12", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and message in result.output, result.output
