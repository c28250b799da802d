"""Data specs and readers on the real data in ../shared/data and on small folders built in tmp_path."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from echocare.data import Problem, UnreadableImage, open_data, parse_spec
from echocare.data.readers import fill_outline, select_limit
from echocare.phantom import generate, write_phantoms

# ----------------------------------------------------------------------------- spec strings


def test_parse_spec_reads_kind_path_and_typed_options():
    assert parse_spec("busi:/x/Dataset_BUSI_with_GT?limit=90&seed=3") == ("busi", "/x/Dataset_BUSI_with_GT", {"limit": 90, "seed": 3})
    assert parse_spec("phantom:120?profiles=linear-a,convex-b&seed=0") == (
        "phantom",
        "120",
        {"profiles": ["linear-a", "convex-b"], "seed": 0},
    )
    assert parse_spec("pocus:/p?frames=4")[2] == {"frames": 4}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nifti:/x", "unknown data kind 'nifti'.*valid kinds: busi, hc18, pocus, folder, csv, dicom, phantom"),
        ("busi:/x?frames=3", "unknown option 'frames' for busi.*valid options: limit, seed"),
        ("busi:/x?limit=many", "limit='many'.*not a valid int"),
        ("busi:/x?limit=5&limit=6", "given twice"),
        ("busi:/x?limit", "malformed options"),
        ("/just/a/path", "has no kind"),
        ("busi:", "has no path"),
        ("phantom:lots", "expected a number of images"),
        ("phantom:10?profiles=linear-z", "unknown phantom profile.*linear-z.*valid: linear-a"),
        ("pocus:/x?frames=-1", "must be >= 0"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(spec, message):
    with pytest.raises(ValueError, match=message):
        open_data(spec)


@pytest.mark.parametrize("kind", ["busi", "hc18", "pocus", "folder", "csv", "dicom"])
def test_missing_path_is_named(tmp_path, kind):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        open_data(f"{kind}:{missing}")


def test_readers_do_not_import_torch():
    """The torch-free edge runtime imports the data layer (checked in a fresh interpreter)."""
    import subprocess

    code = (
        "import sys, echocare.data, echocare.phantom, echocare.data.sitecheck, echocare.data.dicom, echofleet.cli.site;"
        "bad=[m for m in ('torch','scipy','av','pydicom','sklearn') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- BUSI


def test_busi_counts_labels_and_mask_union(busi_root):
    data = open_data(f"busi:{busi_root}")
    assert len(data) == 618 and data.task_hint == "classify"
    assert data.classes == ["benign", "malignant", "normal"]
    counts = {c: sum(s.label == c for s in data.samples) for c in data.classes}
    assert counts == {"benign": 350, "malignant": 163, "normal": 105}
    assert all(s.key.startswith(f"{s.label}/{s.label} (") for s in data.samples)
    assert all(s.load_mask is not None for s in data.samples) and not data.problems
    assert all(s.group for s in data.samples)  # content group, filled by the reader

    by_key = {s.key: s for s in data.samples}
    s = by_key["benign/benign (100).png"]
    m0 = np.asarray(Image.open(busi_root / "benign" / "benign (100)_mask.png")) > 0
    m1 = np.asarray(Image.open(busi_root / "benign" / "benign (100)_mask_1.png")) > 0
    union = s.mask()
    assert union.dtype == np.uint8 and set(np.unique(union)) <= {0, 255}
    assert np.array_equal(union > 0, m0 | m1) and (union > 0).sum() > max(m0.sum(), m1.sum())
    assert s.image().shape == union.shape
    assert not by_key["normal/normal (10).png"].mask().any()


def test_busi_limit_is_stratified_and_deterministic(busi_root):
    a = open_data(f"busi:{busi_root}?limit=90&seed=0")
    b = open_data(f"busi:{busi_root}?limit=90&seed=0")
    c = open_data(f"busi:{busi_root}?limit=90&seed=1")
    assert [s.key for s in a.samples] == [s.key for s in b.samples]
    assert [s.key for s in a.samples] != [s.key for s in c.samples]
    counts = {k: sum(s.label == k for s in a.samples) for k in a.classes}
    assert counts == {"benign": 51, "malignant": 24, "normal": 15}  # 350:163:105 of 90, largest remainder


def test_select_limit_takes_whole_groups_first():
    from echocare.data.base import Sample

    samples = [Sample(f"k{i}", "a" if i < 12 else "b", lambda: None, group=f"g{i // 4}") for i in range(16)]
    picked = select_limit(samples, 8, seed=0)
    assert len(picked) == 8
    groups = {s.group for s in picked}
    # 6 of "a" (3 groups of 4 -> one whole group + part of another) and 2 of "b"
    assert sum(s.label == "a" for s in picked) == 6 and sum(s.label == "b" for s in picked) == 2
    assert len(groups) <= 3


# ----------------------------------------------------------------------------- HC18


def _ellipse_perimeter_mm(mask: np.ndarray, pixel_mm: float) -> float:
    """Perimeter of the ellipse with the same second moments as the mask (Ramanujan II)."""
    ys, xs = np.nonzero(mask)
    cov = np.cov(np.stack([xs, ys]).astype(float))
    lam = np.sort(np.linalg.eigvalsh(cov))[::-1]
    a, b = 2 * math.sqrt(lam[0]) * pixel_mm, 2 * math.sqrt(lam[1]) * pixel_mm
    h = ((a - b) / (a + b)) ** 2
    return math.pi * (a + b) * (1 + 3 * h / (10 + math.sqrt(4 - 3 * h)))


def test_hc18_counts_meta_groups(hc18_root):
    data = open_data(f"hc18:{hc18_root}")
    assert len(data) == 300 and data.task_hint == "hc" and data.classes == [] and not data.problems
    assert all(s.label is None and s.meta["pixel_size_mm"] > 0 and s.meta["hc_mm"] > 0 for s in data.samples)
    by_key = {s.key: s for s in data.samples}
    assert by_key["063_HC.png"].group == by_key["063_3HC.png"].group == "patient-063"
    assert by_key["001_HC.png"].meta == {"pixel_size_mm": 0.08965852, "hc_mm": 56.81, "patient": "001"}  # per-patient DP
    # the same reader accepts the training_set folder itself
    assert len(open_data(f"hc18:{hc18_root / 'training_set'}?limit=5")) == 5


def test_hc18_filled_masks_match_the_csv_head_circumference(hc18_root):
    data = open_data(f"hc18:{hc18_root}?limit=24&seed=0")
    errors = []
    for s in data.samples:
        mask = s.mask() > 0
        outline = np.asarray(Image.open(hc18_root / "training_set" / s.key.replace(".png", "_Annotation.png"))) > 0
        assert mask.shape == s.image().shape
        assert (mask & outline).sum() == outline.sum()  # the outline is part of the filled head
        assert mask.sum() > 20 * outline.sum()  # filled, not just the outline
        errors.append(abs(_ellipse_perimeter_mm(mask, s.meta["pixel_size_mm"]) / s.meta["hc_mm"] - 1))
    assert max(errors) < 0.03, errors


def test_fill_outline_of_an_ellipse_cut_by_the_border():
    """A head running off the image: the hull closes along the border, as the filled ellipse does."""
    from PIL import ImageDraw

    outline, reference = Image.new("L", (200, 120), 0), Image.new("L", (200, 120), 0)
    ImageDraw.Draw(outline).ellipse([40, 30, 180, 170], outline=255)  # bottom part outside the canvas
    ImageDraw.Draw(reference).ellipse([40, 30, 180, 170], outline=255, fill=255)
    filled = fill_outline(np.asarray(outline) > 0) > 0
    truth = np.asarray(reference) > 0
    assert filled[-1].sum() > 100  # filled along the bottom row
    assert (filled ^ truth).sum() < 0.01 * truth.sum()


def test_fill_outline_of_a_drawn_ellipse():
    from PIL import ImageDraw

    canvas = Image.new("L", (200, 120), 0)
    ImageDraw.Draw(canvas).ellipse([30, 20, 170, 100], outline=255)
    filled = fill_outline(np.asarray(canvas) > 0) > 0
    expected = np.pi * 70 * 40
    assert abs(filled.sum() / expected - 1) < 0.03
    with pytest.raises(ValueError):
        fill_outline(np.zeros((5, 5), bool))


# ----------------------------------------------------------------------------- POCUS


def test_pocus_clips_stills_labels_and_frames(pocus_root):
    data = open_data(f"pocus:{pocus_root}?frames=1")
    videos = [s for s in data.samples if s.meta["media"] == "video"]
    stills = [s for s in data.samples if s.meta["media"] == "image"]
    assert len(videos) == 44 and len(stills) == 8 and not data.problems
    assert data.classes == ["Bacterial pneumonia", "COVID-19", "Viral pneumonia", "regular"]
    with (pocus_root / "manifest.tsv").open() as f:
        truth = {r["path"]: (r["label"], r["probe"]) for r in csv.DictReader(f, delimiter="\t")}
    for s in data.samples:
        path = s.key.split("#")[0]
        assert (s.label, s.meta["probe"]) == truth[path]

    three = open_data(f"pocus:{pocus_root}?frames=3")
    clip = "data/pocus_videos/convex/Vir_whitelung_h1n1.mp4"
    frames = [s for s in three.samples if s.group == clip]
    assert len(frames) == 3 and {s.label for s in frames} == {"Viral pneumonia"}
    n = frames[0].meta["n_frames"]
    assert [s.meta["frame"] for s in frames] == [0, round((n - 1) / 2), n - 1]
    images = [s.image() for s in frames]
    assert all(im.shape == (270, 270, 3) and im.dtype == np.uint8 for im in images)
    assert not np.array_equal(images[0], images[2])
    # default: 8 frames per clip
    default = open_data(f"pocus:{pocus_root}")
    assert len(default) == 44 * 8 + 8


def test_pocus_limit_counts_files_and_keeps_clip_frames_together(pocus_root):
    data = open_data(f"pocus:{pocus_root}?limit=10&frames=2")
    files = {s.group for s in data.samples}
    assert len(files) == 10
    for g in files:
        n = sum(s.group == g for s in data.samples)
        assert n in (1, 2)  # a still, or both frames of a clip


# ----------------------------------------------------------------------------- folder / CSV / corrupt files


def _write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def test_folder_reader_with_masks_orphans_and_a_corrupt_file(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cyst", "solid"):
        for i in range(3):
            _write_png(tmp_path / cls / f"img{i}.png", rng.integers(0, 255, (40, 50), dtype=np.uint8))
    _write_png(tmp_path / "cyst" / "img0_mask.png", np.full((40, 50), 255, np.uint8))
    _write_png(tmp_path / "solid" / "ghost_mask.png", np.zeros((40, 50), np.uint8))  # no image
    (tmp_path / "solid" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
    (tmp_path / "solid" / "notes.txt").write_text("not an image")

    data = open_data(f"folder:{tmp_path}")
    assert data.classes == ["cyst", "solid"] and len(data) == 7
    assert [p.reason for p in data.problems] == ["mask file without a matching image"]
    by_key = {s.key: s for s in data.samples}
    assert by_key["cyst/img0.png"].mask().all() and by_key["cyst/img1.png"].mask() is None

    seen = [s.key for s, _ in data.iter_images()]  # never raises
    assert "solid/broken.png" not in seen and len(seen) == 6
    broken = [p for p in data.problems if p.path.endswith("broken.png")]
    assert len(broken) == 1 and broken[0].reason.startswith(("cannot decode", "not a recognised image"))


def test_read_image_names_file_and_reason(tmp_path):
    from echocare.data.images import read_image

    good = _write_png(tmp_path / "good.png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    for path, reason in [(truncated, "cannot decode"), (tmp_path / "none.png", "file not found")]:
        with pytest.raises(UnreadableImage, match=reason) as e:
            read_image(path)
        assert e.value.path == str(path)
    # 16-bit and palette images come back as uint8
    Image.fromarray(np.arange(0, 4096, 64, dtype=np.uint16).reshape(8, 8)).save(tmp_path / "deep.png")
    deep = read_image(tmp_path / "deep.png")
    assert deep.dtype == np.uint8 and deep.min() == 0 and deep.max() == 255
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (8, 8, 3)


def test_csv_manifest_relative_paths_masks_groups(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(4):
        _write_png(tmp_path / "imgs" / f"{i}.png", rng.integers(0, 255, (30, 30), dtype=np.uint8))
    _write_png(tmp_path / "imgs" / "0_m.png", np.full((30, 30), 255, np.uint8))
    manifest = tmp_path / "lists" / "site.csv"
    manifest.parent.mkdir()
    manifest.write_text(
        "path,label,mask,group\n"
        "../imgs/0.png,benign,../imgs/0_m.png,p1\n"
        "../imgs/1.png,benign,,p1\n"
        "../imgs/2.png,malignant,,\n"
        "../imgs/missing.png,malignant,,\n"
    )
    data = open_data(f"csv:{manifest}")
    assert data.classes == ["benign", "malignant"] and len(data) == 4
    assert data.samples[0].mask().all() and data.samples[1].mask() is None
    assert data.samples[0].group == data.samples[1].group == "p1" and data.samples[2].group is None
    list(data.iter_images())
    assert data.problems == [Problem(str(manifest.parent / "../imgs/missing.png"), "file not found")]

    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\nx.png,a\n")
    with pytest.raises(ValueError, match="lacks column.*path.*label"):
        open_data(f"csv:{bad}")


# ----------------------------------------------------------------------------- phantoms


def test_phantom_spec_generates_the_same_pixels_as_the_generator():
    data = open_data("phantom:6?profiles=linear-a,convex-b&seed=4")
    assert [s.meta["profile"] for s in data.samples] == ["linear-a", "convex-b"] * 3
    assert [s.label for s in data.samples] == ["benign", "benign", "malignant", "malignant", "normal", "normal"]
    s = data.samples[3]
    ph = generate(3, "convex-b", "malignant", seed=4)
    assert s.key == "malignant/phantom-convex-b-00003.png"
    assert np.array_equal(s.image(), ph.image) and np.array_equal(s.mask(), ph.mask)


def test_written_phantoms_read_back_through_busi_and_folder(tmp_path):
    out = tmp_path / "ph"
    write_phantoms(out, 6, ["linear-c", "convex-b"], seed=2)
    memory = open_data("phantom:6?profiles=linear-c,convex-b&seed=2")
    for kind in ("busi", "folder"):
        disk = open_data(f"{kind}:{out}")
        assert sorted(s.key for s in disk.samples) == sorted(s.key for s in memory.samples)
        by_key = {s.key: s for s in disk.samples}
        for m in memory.samples:
            d = by_key[m.key]
            assert d.label == m.label and d.meta["profile"] == m.meta["profile"]
            assert np.array_equal(d.image(), m.image()) and np.array_equal(d.mask(), m.mask())


# ----------------------------------------------------------------------------- bad files and rows: reported, counted, skipped


def _corrupt_files(folder: Path, good: Path) -> dict[str, str]:
    """Broken files of every still-image kind next to good ones; name -> what the reason starts with."""
    data = good.read_bytes()
    rng = np.random.default_rng(3)
    broken = {
        "empty.png": b"",
        "random.png": bytes(rng.integers(0, 255, 500, dtype=np.uint8)),
        "truncated.png": data[: len(data) // 2],
        "bad-crc.png": data[:40] + bytes([data[40] ^ 0xFF]) + data[41:],
        "header-only.jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00",
        "bad.tif": b"II*\x00" + bytes(rng.integers(0, 255, 64, dtype=np.uint8)),
        "bad.gif": b"GIF89a\x10\x00\x10\x00" + bytes(rng.integers(0, 255, 30, dtype=np.uint8)),
        "bad.bmp": b"BM" + bytes(rng.integers(0, 255, 60, dtype=np.uint8)),
        "bad.webp": b"RIFF\x10\x00\x00\x00WEBPVP8 " + bytes(rng.integers(0, 255, 20, dtype=np.uint8)),
    }
    for name, content in broken.items():
        (folder / name).write_bytes(content)
    return {name: ("cannot decode", "not a recognised image") for name in broken}


def test_every_corrupt_image_kind_is_reported_counted_and_skipped(tmp_path):
    from echocare.data.sitecheck import check_site

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(3):
            _write_png(tmp_path / cls / f"img{i}.png", rng.integers(0, 255, (40, 50), dtype=np.uint8))
    expected = _corrupt_files(tmp_path / "b", tmp_path / "a" / "img0.png")
    report = check_site(open_data(f"folder:{tmp_path}"))  # must not raise
    assert report.readable == 6 and report.listed == 6 + len(expected)
    reasons = {p.path.split("/")[-1]: p.reason for p in report.problems}
    assert set(reasons) == set(expected)
    for name, starts in expected.items():
        assert reasons[name].startswith(starts), (name, reasons[name])
    assert report.problem_files == len(expected) and report.ok  # both classes still have images


def test_csv_manifest_rows_without_a_path_are_problems_not_an_abort(tmp_path):
    _write_png(tmp_path / "0.png", np.full((20, 20), 90, np.uint8))
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n0.png,a\n,b\n   ,a\nmissing.png,b\n")
    data = open_data(f"csv:{manifest}")
    assert [s.key for s in data.samples] == ["0.png", "missing.png"]
    assert data.problems == [Problem(f"{manifest} line 3", "empty path: row skipped"),
                             Problem(f"{manifest} line 4", "empty path: row skipped")]
    from echocare.data.sitecheck import check_site

    report = check_site(data)
    assert report.readable == 1 and report.problem_files == 3
    assert Problem(str(tmp_path / "missing.png"), "file not found") in report.problems


def test_hc18_bad_rows_are_problems_naming_the_image(tmp_path, hc18_root):
    real = sorted((hc18_root / "training_set").glob("*HC.png"))[:6]
    for i, src in enumerate(real, start=1):  # real images and outlines under the names the CSV below uses
        (tmp_path / f"00{i}_HC.png").write_bytes(src.read_bytes())
        (tmp_path / f"00{i}_HC_Annotation.png").write_bytes(src.with_name(src.stem + "_Annotation.png").read_bytes())
    (tmp_path / "training_set_pixel_size_and_HC.csv").write_text(
        "filename,pixel size(mm),head circumference (mm)\n"
        "001_HC.png,0.0691,44.3\n"
        "002_HC.png,ab,44.3\n"  # pixel size not a number
        "003_HC.png,0.07,-5\n"  # negative HC
        "004_HC.png,nan,40\n"
        "005_HC.png\n"  # short row
        ",0.07,40\n"  # no file name
        "001_HC.png,0.05,40\n"  # second row for one image
    )
    data = open_data(f"hc18:{tmp_path}")
    assert [s.key for s in data.samples] == ["001_HC.png"] and data.samples[0].meta["pixel_size_mm"] == 0.0691
    by_path = {}
    for p in data.problems:
        by_path.setdefault(p.path.split("/")[-1], []).append(p.reason)
    assert by_path["002_HC.png"] == ["training_set_pixel_size_and_HC.csv line 3: could not convert string to float: 'ab'; skipped"]
    assert "must be positive numbers" in by_path["003_HC.png"][0] and "must be positive numbers" in by_path["004_HC.png"][0]
    assert by_path["005_HC.png"][0].startswith("training_set_pixel_size_and_HC.csv line 6:")
    assert by_path["training_set_pixel_size_and_HC.csv line 7"] == ["training_set_pixel_size_and_HC.csv line 7: empty filename; skipped"]
    assert by_path["001_HC.png"] == ["training_set_pixel_size_and_HC.csv line 8: second row for this image; the first is kept"]
    assert by_path["006_HC.png"] == ["no row in training_set_pixel_size_and_HC.csv: pixel size and HC unknown"]
    assert len(data.problems) == 7  # each bad image once


def test_pocus_rows_and_clips_that_fail_are_problems(tmp_path, pocus_root):
    with (pocus_root / "manifest.tsv").open() as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    clip = next(r for r in rows if r["path"].endswith(".mp4"))
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "good.mp4").write_bytes((pocus_root / clip["path"]).read_bytes())
    (tmp_path / "clips" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "clips" / "empty.mp4").write_bytes(b"")
    (tmp_path / "manifest.tsv").write_text(
        "path\tlabel\n"
        "clips/good.mp4\tx\n"
        "clips/random.mp4\tx\n"
        "clips/empty.mp4\ty\n"
        "clips/missing.mp4\ty\n"
        "\tx\n"
    )
    data = open_data(f"pocus:{tmp_path}?frames=2")
    assert {s.key.split("#")[0] for s in data.samples} == {"clips/good.mp4"} and len(data) == 2
    reasons = {p.path.split("/")[-1]: p.reason for p in data.problems}
    assert set(reasons) == {"random.mp4", "empty.mp4", "missing.mp4", "manifest.tsv line 6"}
    assert all(r.startswith(("cannot read clip", "no video stream", "clip has no frames")) for k, r in reasons.items() if k.endswith(".mp4"))
    assert reasons["manifest.tsv line 6"] == "empty path: row skipped"
