"""Phantom generator: determinism, layout on disk, device profiles that differ, learnable classes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from echofleet.cli import app
from echocare.phantom import CLASSES, PROFILES, generate, plan, resolve_profiles, write_phantoms
from echocare.preprocess import PreprocessSpec, geometric_image


def test_generation_is_deterministic_and_seeded():
    a = generate(7, "linear-c", "malignant", seed=11)
    b = generate(7, "linear-c", "malignant", seed=11)
    c = generate(7, "linear-c", "malignant", seed=12)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint8 and a.image.shape == PROFILES["linear-c"].frame_hw


@pytest.mark.parametrize("profile", list(PROFILES))
def test_masks_match_classes(profile):
    for i, label in enumerate(CLASSES * 2):
        ph = generate(i, profile, label, seed=0)
        assert ph.mask.shape == ph.image.shape and set(np.unique(ph.mask)) <= {0, 255}
        lesion = (ph.mask > 0).mean()
        if label == "normal":
            assert lesion == 0
        else:
            assert 0.001 < lesion < 0.25
            y0, y1, x0, x1 = ph.meta["sector_box"]
            inside = np.zeros_like(ph.mask, bool)
            inside[y0:y1, x0:x1] = True
            assert not (ph.mask > 0)[~inside].any()  # lesions only inside the image region


def test_malignant_lesions_are_irregular_and_shadow():
    """Shape and posterior signs, measured, not assumed: malignant = less convex, darker below."""

    def solidity(mask: np.ndarray) -> float:
        from echocare.data.readers import fill_outline

        return mask.sum() / (fill_outline(mask) > 0).sum()

    def below_ratio(ph) -> float | None:
        """Mean brightness of the band under the lesion / the same rows elsewhere in the image."""
        m = ph.mask > 0
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ph.meta["sector_box"]
        rows = slice(ys.max() + 3, min(ys.max() + 25, y1))
        if rows.stop - rows.start < 8:
            return None  # lesion too deep to see below it
        quarter = (xs.max() - xs.min()) // 4
        band = np.zeros(m.shape, bool)
        band[rows, xs.min() + quarter : xs.max() - quarter + 1] = True
        elsewhere = np.zeros(m.shape, bool)
        elsewhere[rows, x0:x1] = True
        elsewhere &= ~band
        elsewhere[:, xs.min() - 5 : xs.max() + 6] = False
        return ph.image[band].mean() / ph.image[elsewhere].mean()

    benign = [generate(i, "linear-a", "benign", seed=0) for i in range(8)]
    malignant = [generate(i, "linear-a", "malignant", seed=0) for i in range(8)]
    assert np.mean([solidity(p.mask > 0) for p in benign]) > 0.97
    assert np.mean([solidity(p.mask > 0) for p in malignant]) < 0.9
    shadow = [r for r in map(below_ratio, malignant) if r is not None]
    enhancement = [r for r in map(below_ratio, benign) if r is not None]
    assert len(shadow) >= 5 and len(enhancement) >= 5
    assert np.mean(shadow) < 0.8 and np.mean(enhancement) > 1.0


def test_profiles_differ_in_speckle_brightness_and_geometry():
    def grain(img: np.ndarray) -> float:
        """Lateral speckle correlation length: lag at which the autocorrelation drops below 0.5."""
        patch = img[120:180, 100:160].astype(float)
        patch -= patch.mean()
        ac = [1.0] + [np.mean(patch[:, k:] * patch[:, :-k]) / patch.var() for k in range(1, 12)]
        return float(np.argmax(np.asarray(ac) < 0.5))

    stats = {}
    for name in PROFILES:
        imgs = [generate(i, name, "normal", seed=0).image for i in range(3)]
        stats[name] = (np.mean([grain(im) for im in imgs]), np.mean([im[im > 0].mean() for im in imgs]))
    assert stats["convex-b"][0] > stats["linear-a"][0]  # coarser speckle
    assert abs(stats["linear-a"][1] - stats["convex-b"][1]) > 5  # different gain / dynamic range
    for name, black in (("convex-b", (0.2, 0.6)), ("linear-a", (0.0, 0.01)), ("linear-c", (0.0, 0.01))):
        ph = generate(0, name, "normal")
        y0, y1, x0, x1 = ph.meta["sector_box"]
        share = (ph.image[y0:y1, x0:x1] == 0).mean()
        assert black[0] <= share <= black[1], (name, share)  # a fan on black, or a full rectangle


def test_plan_balances_classes_per_profile_and_resolves_names():
    rows = plan(12, ["linear-a", "convex-b"])
    assert [r[1] for r in rows[:4]] == ["linear-a", "convex-b", "linear-a", "convex-b"]
    for p in ("linear-a", "convex-b"):
        assert sorted(r[2] for r in rows if r[1] == p) == sorted(CLASSES * 2)
    assert resolve_profiles("all") == list(PROFILES) and resolve_profiles(None) == list(PROFILES)
    with pytest.raises(ValueError, match="unknown phantom profile"):
        resolve_profiles("linear-a,sector-x")


def test_cli_writes_busi_layout_with_synthetic_notice(tmp_path):
    out = tmp_path / "phantoms"
    result = CliRunner().invoke(app, ["phantom", str(out), "--n", "6", "--profile", "convex-b,linear-a", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC" in result.output
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(files) == 12 and all("phantom" in f for f in files)
    assert "normal/phantom-convex-b-00004.png" in files and "normal/phantom-convex-b-00004_mask.png" in files
    assert "synthetic" in (out / "SYNTHETIC.txt").read_text().lower()
    manifest = json.loads((out / "phantom.json").read_text())
    assert manifest["synthetic"] is True and manifest["seed"] == 3 and set(manifest["profiles"]) == {"convex-b", "linear-a"}
    assert manifest["profiles"]["convex-b"]["geometry"] == "convex"
    assert manifest["files"]["normal/phantom-convex-b-00004.png"] == {"profile": "convex-b", "label": "normal", "index": 4, "lesion_pixels": 0}
    img = np.asarray(Image.open(out / "benign" / "phantom-convex-b-00000.png"))
    assert np.array_equal(img, generate(0, "convex-b", "benign", seed=3).image)
    bad = CliRunner().invoke(app, ["phantom", str(tmp_path / "x"), "--profile", "nope"])
    assert bad.exit_code == 2 and "unknown phantom profile" in bad.output


def test_writer_replaces_a_phantom_set_but_not_other_folders(tmp_path):
    out = tmp_path / "ph"
    write_phantoms(out, 9, "linear-a", seed=0)
    write_phantoms(out, 3, "linear-a", seed=0)  # smaller set: no stale files from the first run
    assert len(list(out.rglob("*_mask.png"))) == 3
    other = tmp_path / "hospital"
    other.mkdir()
    (other / "scan.png").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        write_phantoms(other, 3)
    assert (other / "scan.png").read_bytes() == b"x"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def _random_conv_features(images: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Frozen random 7x7 filters -> ReLU -> mean / max / 90th percentile pooling (numpy FFT)."""
    spec = PreprocessSpec(size=64)
    kernels = rng.standard_normal((16, 7, 7))
    kernels -= kernels.mean(axis=(1, 2), keepdims=True)
    out = []
    for img in images:
        x = geometric_image(img, spec)[0].astype(float) / 255
        fx = np.fft.rfft2(x)
        feats = []
        for k in kernels:
            r = np.maximum(np.fft.irfft2(fx * np.fft.rfft2(k, s=x.shape), s=x.shape), 0)
            feats += [r.mean(), r.max(), np.percentile(r, 90)]
        out.append(feats)
    return np.asarray(out)


def test_classes_are_learnable_but_not_from_mean_brightness():
    sklearn = pytest.importorskip("sklearn", reason="the probe uses scikit-learn (train extra)")
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    assert sklearn
    rows = plan(90, list(PROFILES))
    phantoms = [generate(i, p, label, seed=0) for i, p, label in rows]
    labels = [label for _, _, label in rows]
    features = _random_conv_features([ph.image for ph in phantoms], np.random.default_rng(0))
    brightness = np.array([[ph.image[ph.image > 0].mean()] for ph in phantoms])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    acc = cross_val_score(probe, features, labels, cv=3).mean()
    acc_mean = cross_val_score(probe, brightness, labels, cv=3).mean()
    print(f"random-conv probe accuracy {acc:.2f}, brightness-only {acc_mean:.2f} (chance 0.33)")
    assert acc > 0.6  # chance is 1/3
    assert acc_mean < 0.5 and acc > acc_mean + 0.2
