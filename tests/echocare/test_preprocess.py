"""Preprocessing: determinism, the crop (phantoms with a known sector, real images padded with
black borders and text), masks following their images, input validation."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from echocare.phantom import PROFILES, generate
from echocare.preprocess import (
    Geometry,
    PreprocessSpec,
    _largest_component,
    apply_geometry_to_mask,
    find_image_region,
    geometric_image,
    normalize,
    preprocess_batch,
    preprocess_image,
    to_gray_uint8,
)

SPEC = PreprocessSpec()


def _busi_image(busi_root, name="benign/benign (10).png") -> np.ndarray:
    return np.asarray(Image.open(busi_root / name))


def test_same_input_gives_identical_output_every_time():
    ph = generate(4, "convex-b", "malignant", seed=3)
    a, ga = preprocess_image(ph.image, SPEC)
    b, gb = preprocess_image(ph.image.copy(), SPEC)
    assert a.dtype == np.float32 and a.shape == (3, 256, 256)
    assert np.array_equal(a, b) and ga == gb
    # the batch path is the same computation
    batch = preprocess_batch([ph.image, ph.image], SPEC)
    assert batch.shape == (2, 3, 256, 256) and np.array_equal(batch[0], a) and np.array_equal(batch[1], a)
    assert preprocess_batch([], SPEC).shape == (0, 3, 256, 256)


def test_normalize_uses_spec_mean_and_std():
    sq = np.full((4, 4), 255, np.uint8)
    x = normalize(sq, SPEC)
    expected = (1.0 - np.array(SPEC.mean)) / np.array(SPEC.std)
    assert np.allclose(x[:, 0, 0], expected, atol=1e-6)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_crop_finds_the_known_sector_of_phantoms(profile):
    """The phantom's image region is known exactly; text and depth ticks around it are dropped."""
    for i in range(4):
        ph = generate(i, profile, ("benign", "malignant", "normal")[i % 3], seed=1)
        assert find_image_region(ph.image, SPEC) == tuple(ph.meta["sector_box"])
        # there *is* burned-in text outside the sector, so a crop that kept it would be wrong
        y0, y1, x0, x1 = ph.meta["sector_box"]
        assert ph.image[:y0].max() > 150


def test_crop_disabled_keeps_whole_frame():
    ph = generate(0, "convex-b", "normal")
    assert find_image_region(ph.image, PreprocessSpec(crop=False)) == (0, ph.image.shape[0], 0, ph.image.shape[1])


def test_crop_removes_black_border_and_text_around_a_real_image(busi_root):
    img = _busi_image(busi_root)
    h, w = img.shape
    top, left, bottom, right = 57, 31, 23, 64
    padded = np.zeros((h + top + bottom, w + left + right), np.uint8)
    padded[top : top + h, left : left + w] = img
    canvas = Image.fromarray(padded)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), "HOSPITAL 12 L12-5 MI 1.1 TIS 0.4", fill=255)  # text band above the image
    draw.text((4, 24), "08/11/2025 10:42", fill=230)
    for y in range(top, top + h, 40):  # depth ticks right of the image
        draw.line([(left + w + 12, y), (left + w + 18, y)], fill=255)
    padded = np.asarray(canvas)
    assert find_image_region(padded, SPEC) == (top, top + h, left, left + w)
    # and so the network input is the same as for the unpadded image
    assert np.array_equal(preprocess_image(padded, SPEC)[0], preprocess_image(img, SPEC)[0])


def test_crop_on_hc18_fan_keeps_the_fan(hc18_root):
    img = np.asarray(Image.open(hc18_root / "training_set" / "001_HC.png"))
    y0, y1, x0, x1 = find_image_region(img, SPEC)
    inside, outside = img[y0:y1, x0:x1], img.copy()
    outside[y0:y1, x0:x1] = 0
    assert (inside > SPEC.crop_threshold).mean() > 0.5
    # almost no image content is left outside the box (HC18 has a thin marker line at the edge)
    assert (outside > SPEC.crop_threshold).sum() < 0.01 * img.size


def test_largest_component_matches_scipy_labelling():
    ndimage = pytest.importorskip("scipy.ndimage", reason="scipy is the reference implementation here")
    rng = np.random.default_rng(0)
    for trial in range(30):
        mask = rng.random((40, 57)) < rng.uniform(0.3, 0.7)
        labels, n = ndimage.label(mask)  # default structure = 4-connectivity
        got = _largest_component(mask)
        if n == 0:
            assert got is None
            continue
        sizes = np.bincount(labels.ravel())[1:]
        assert got.sum() == sizes.max()
        # the chosen component is one of scipy's components, entirely
        ids = np.unique(labels[got])
        assert len(ids) == 1 and (labels == ids[0]).sum() == got.sum()
    assert _largest_component(np.zeros((5, 5), bool)) is None


def test_masks_follow_their_images_geometry():
    """A bright square on a padded dark frame: its mask lands exactly where the square lands."""
    img = np.zeros((300, 420), np.uint8)
    img[40:260, 70:380] = 90  # the image region
    img[100:160, 150:250] = 250  # a bright "lesion"
    mask = np.zeros_like(img)
    mask[100:160, 150:250] = 255
    sq, g = geometric_image(img, SPEC)
    m = apply_geometry_to_mask(mask, g)
    assert g.crop == (40, 260, 70, 380)
    assert m.dtype == np.uint8 and set(np.unique(m)) == {0, 1}
    bright = sq > 200
    iou = (bright & (m > 0)).sum() / (bright | (m > 0)).sum()
    assert iou > 0.9


def test_phantom_lesion_mask_is_darker_after_preprocessing():
    """Hypoechoic lesions: after the same geometry, the masked pixels are darker than the rest."""
    for i in range(3):
        ph = generate(i, "linear-a", "benign", seed=2)
        sq, g = geometric_image(ph.image, SPEC)
        m = apply_geometry_to_mask(ph.mask, g)
        core = np.asarray(Image.fromarray(m * 255).filter(ImageFilter.MinFilter(7))) > 0  # away from the rim
        assert core.sum() > 50
        assert sq[core].mean() < 0.8 * sq[(m == 0) & (sq > 0)].mean()


def test_mask_of_wrong_size_is_refused():
    img = np.full((100, 120), 80, np.uint8)
    _, g = geometric_image(img, SPEC)
    with pytest.raises(ValueError, match="does not match"):
        apply_geometry_to_mask(np.zeros((90, 120), np.uint8), g)


def test_geometry_maps_pixel_size_back_to_mm():
    img = np.full((400, 200), 80, np.uint8)
    _, g = geometric_image(img, SPEC)
    assert isinstance(g, Geometry) and g.scale == pytest.approx(256 / 400)
    assert g.output_pixel_mm(0.1) == pytest.approx(0.1 * 400 / 256)


def test_to_gray_handles_all_input_kinds():
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 1] = 200
    assert to_gray_uint8(rgb).shape == (8, 9) and to_gray_uint8(rgb)[0, 0] == round(0.587 * 200)
    rgba = np.dstack([rgb, np.full((8, 9), 7, np.uint8)])
    assert np.array_equal(to_gray_uint8(rgba), to_gray_uint8(rgb))
    sixteen = np.linspace(0, 4095, 72).reshape(8, 9).astype(np.uint16)
    g16 = to_gray_uint8(sixteen)
    assert g16.dtype == np.uint8 and g16.min() == 0 and g16.max() == 255
    f = np.linspace(0, 1, 72).reshape(8, 9)
    f[0, 0] = np.nan
    assert to_gray_uint8(f)[0, 0] == 0 and to_gray_uint8(f).max() == 255
    assert to_gray_uint8(np.eye(4, dtype=bool)).max() == 255
    with pytest.raises(ValueError, match="empty"):
        to_gray_uint8(np.zeros((0, 5), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        to_gray_uint8(np.zeros((4, 4, 2), np.uint8))


def test_spec_round_trips_and_digest_tracks_changes():
    spec = PreprocessSpec(size=224)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    assert spec.digest() == PreprocessSpec.from_json(spec.to_json()).digest()
    assert spec.digest() != PreprocessSpec(size=256).digest()
    with pytest.raises(ValueError, match="unknown PreprocessSpec field"):
        PreprocessSpec.from_dict({"size": 3, "colour": 1})


# ----------------------------------------------------------------------------- EchoCare's input (spec version 2)

V1_DICT = {  # what every checkpoint and bundle written before version 2 recorded
    "size": 256, "crop": True, "crop_threshold": 10, "crop_search_px": 128, "crop_min_fraction": 0.05,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "version": 1,
}


def test_default_input_is_echocare_s_own_gray_in_0_1_without_mean_std():
    """The released encoder was pretrained on [0, 1] inputs: gray replicated, no ImageNet statistics."""
    ph = generate(1, "linear-a", "benign", seed=0)
    x, _ = preprocess_image(ph.image, SPEC)
    sq, _ = geometric_image(ph.image, SPEC)
    assert SPEC.version == 2 and SPEC.mean == (0.0, 0.0, 0.0) and SPEC.std == (1.0, 1.0, 1.0)
    assert np.array_equal(x[0], sq.astype(np.float32) / 255.0)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))  # every gray level, already 256 x 256
    r, _ = preprocess_image(ramp, PreprocessSpec(crop=False))
    assert r.min() == 0.0 and r.max() == 1.0 and np.allclose(r[1, 7], np.arange(256) / 255.0)


def test_version_1_spec_is_reproduced_and_never_shares_a_cache_key():
    old = PreprocessSpec.from_dict(V1_DICT)
    assert old.version == 1 and old.mean == (0.485, 0.456, 0.406) and old.resize == "letterbox"
    assert old.digest() != SPEC.digest()
    ph = generate(2, "convex-b", "normal", seed=0)
    sq, _ = geometric_image(ph.image, SPEC)
    x_old, _ = preprocess_image(ph.image, old)
    expected = (sq.astype(np.float32) / 255.0 - np.float32(0.485)) / np.float32(0.229)
    assert np.allclose(x_old[0], expected, atol=1e-6)
    # a version-1 spec that did not spell out its statistics still means ImageNet's
    bare = {k: v for k, v in V1_DICT.items() if k not in ("mean", "std")}
    assert PreprocessSpec.from_dict(bare) == old
    with pytest.raises(ValueError, match="version 9 is newer"):
        PreprocessSpec.from_dict({**V1_DICT, "version": 9})


def test_stretch_fills_the_square_and_refuses_millimetres():
    img = np.full((200, 400), 90, np.uint8)
    img[50:150, 100:300] = 200
    letter, gl = geometric_image(img, SPEC)
    stretch_spec = PreprocessSpec(resize="stretch")
    stretched, gs = geometric_image(img, stretch_spec)
    assert gl.pad == (64, 0) and (letter[:64] == 0).all()  # letterbox pads the short side with black
    assert gs.pad == (0, 0) and gs.resized == (256, 256) and gs.stretched
    assert (stretched > 0).all()  # the whole square is image
    # the bright box covers the middle half of both axes after stretching
    assert stretched[128, 128] == 200 and stretched[20, 128] == 90 and stretched[128, 20] == 90
    assert gs.scale_yx == pytest.approx((256 / 200, 256 / 400))
    with pytest.raises(ValueError, match="not square"):
        gs.output_pixel_mm(0.1)
    # a square crop stretched is a letterbox without padding: millimetres still work
    sq_img = np.full((300, 300), 90, np.uint8)
    assert geometric_image(sq_img, stretch_spec)[1].output_pixel_mm(0.3) == pytest.approx(0.3 * 300 / 256)
    # masks follow the stretched geometry
    mask = np.zeros_like(img)
    mask[50:150, 100:300] = 255
    m = apply_geometry_to_mask(mask, gs)
    assert m[128, 128] == 1 and m[20, 128] == 0 and 0.2 < m.mean() < 0.3
    assert PreprocessSpec.from_json(stretch_spec.to_json()) == stretch_spec
    assert stretch_spec.digest() != SPEC.digest()


@pytest.mark.parametrize("kwargs, message", [
    ({"resize": "crop"}, "resize='crop'"),
    ({"std": (1.0, 0.0, 1.0)}, "must be > 0"),
    ({"size": 0}, "positive"),
])
def test_bad_spec_fields_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessSpec(**kwargs)
