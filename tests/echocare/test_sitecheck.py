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
