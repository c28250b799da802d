"""DICOM reader on pydicom's real ultrasound test files and on small files written here."""

from __future__ import annotations

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="DICOM support is the optional `dicom` extra (pydicom)")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid  # noqa: E402

from echocare.data import open_data  # noqa: E402
from echocare.data.dicom import META_KEYS, read_header  # noqa: E402

FILES = {
    "examples_rgb_color.dcm": ((240, 320, 3), "RGB", 1),
    "examples_palette.dcm": ((350, 800, 3), "PALETTE COLOR", 1),
    "examples_jpeg2k.dcm": ((480, 640, 3), "YBR_RCT", 1),
    "examples_ybr_color.dcm": ((240, 320, 3), "YBR_FULL_422", 30),
    "ExplVR_BigEnd.dcm": ((60, 80, 3), "RGB", 1),
}
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs", "InstitutionName")


def _patient_values(path: str) -> set[str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return {str(ds.get(k)) for k in PATIENT_KEYWORDS if ds.get(k) not in (None, "")}


def _assert_no_patient_data(data, path: str) -> None:
    secrets = _patient_values(path)
    for s in data.samples:
        assert set(s.meta) <= set(META_KEYS), s.meta
        text = repr(s.meta) + s.key + str(s.group)
        assert not any(v in text for v in secrets if len(v) > 2), (secrets, text)


@pytest.mark.parametrize("name", list(FILES))
def test_pydicom_ultrasound_files_decode_to_rgb_uint8(name):
    path = get_testdata_file(name)
    shape, photometric, frames = FILES[name]
    data = open_data(f"dicom:{path}?frames=2")
    assert not data.problems and data.classes == [] and data.task_hint is None
    assert len(data) == min(frames, 2)
    for s in data.samples:
        img = s.image()
        assert img.shape == shape and img.dtype == np.uint8 and img.max() > 0
        assert s.meta["photometric"] == photometric and s.meta["n_frames"] == frames and s.meta["modality"] == "US"
    _assert_no_patient_data(data, path)
    # only image attributes are parsed from the header
    header = read_header(get_testdata_file(name))
    assert not any(k in header for k in PATIENT_KEYWORDS)


def test_multiframe_ybr_gives_30_frames_converted_to_rgb():
    path = get_testdata_file("examples_ybr_color.dcm")
    data = open_data(f"dicom:{path}")
    assert len(data) == 30
    assert [s.meta["frame"] for s in data.samples] == list(range(30))
    assert [s.key for s in data.samples][:2] == ["examples_ybr_color.dcm#0", "examples_ybr_color.dcm#1"]
    assert len({s.group for s in data.samples}) == 1  # frames of one file split together
    full = pydicom.dcmread(path).pixel_array  # pydicom converts YBR -> RGB itself
    for k in (0, 17, 29):
        img = data.samples[k].image()
        assert np.array_equal(img, full[k])
        raw = pixel_array(path, index=k, raw=True)
        assert not np.array_equal(img, raw)  # a conversion really happened
        assert np.array_equal(img, convert_color_space(raw, "YBR_FULL_422", "RGB"))
    five = open_data(f"dicom:{path}?frames=5")
    assert [s.meta["frame"] for s in five.samples] == [0, 7, 14, 22, 29]


def test_palette_color_goes_through_the_lut():
    path = get_testdata_file("examples_palette.dcm")
    img = open_data(f"dicom:{path}").samples[0].image()
    lut = apply_color_lut(pixel_array(path), pydicom.dcmread(path))
    assert np.array_equal(img, (lut >> 8).astype(np.uint8))
    assert (img[..., 0] != img[..., 2]).any()  # really colour, not gray replicated


def _write(path, pixels: np.ndarray, photometric: str, **attrs) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Modality = "US"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-4711"
    ds.PatientBirthDate = "19800101"
    ds.set_pixel_data(pixels, photometric, bits_stored=attrs.pop("bits_stored", pixels.dtype.itemsize * 8))
    for k, v in attrs.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_monochrome_windowing_inversion_and_classes_from_folders(tmp_path):
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # 8 x 256, 12-bit
    _write(tmp_path / "liver" / "a.dcm", ramp, "MONOCHROME2", bits_stored=12, WindowCenter=2048, WindowWidth=1024)
    _write(tmp_path / "liver" / "b.dcm", ramp, "MONOCHROME2", bits_stored=12)  # no window: min..max
    _write(tmp_path / "kidney" / "c.dcm", np.tile(np.arange(256, dtype=np.uint8), (8, 1)), "MONOCHROME1")
    (tmp_path / "kidney" / "broken.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage")
    data = open_data(f"dicom:{tmp_path}")
    assert data.classes == ["kidney", "liver"] and data.task_hint == "classify"
    assert [p.path.endswith("broken.dcm") for p in data.problems] == [True]
    by_key = {s.key: s for s in data.samples}
    windowed = by_key["liver/a.dcm"].image()
    assert windowed.dtype == np.uint8 and windowed.shape == (8, 256)
    row = windowed[0].astype(int)
    # 1536..2560 is the window: black below, white above, linear inside
    assert (row[ramp[0] < 1530] == 0).all() and (row[ramp[0] > 2566] == 255).all()
    inside = (ramp[0] > 1600) & (ramp[0] < 2500)
    assert (np.diff(row[inside]) >= 0).all() and np.ptp(row[inside]) > 180
    full = by_key["liver/b.dcm"].image()[0]
    assert full[0] == 0 and full[-1] == 255
    inverted = by_key["kidney/c.dcm"].image()[0]
    assert inverted[0] == 255 and inverted[-1] == 0  # MONOCHROME1: 0 is white
    for s in data.samples:
        text = repr(s.meta) + s.key
        assert "Doe" not in text and "4711" not in text and "1980" not in text
        assert set(s.meta) <= set(META_KEYS)


# ----------------------------------------------------------------------------- bad headers never stop a dataset

RGB, PALETTE, YBR = "examples_rgb_color.dcm", "examples_palette.dcm", "examples_ybr_color.dcm"


def _native_multiframe(path) -> None:
    """An uncompressed 3-frame RGB file made from pydicom's RGB example."""
    ds = pydicom.dcmread(get_testdata_file(RGB))
    a = ds.pixel_array
    ds.set_pixel_data(np.stack([a, a[::-1], a[:, ::-1]]), "RGB", 8)
    ds.save_as(path)


def _with_raw_value(src, dst, keyword: str, raw: bytes) -> None:
    """Copy ``src`` with the bytes of one text element (IS, CS, DS...) replaced by ``raw``, exactly as
    a broken scanner would write them (pydicom refuses to write such values itself)."""
    import struct

    ds = pydicom.dcmread(src)
    el = ds[keyword]
    placeholder = "7" * len(raw)
    ds[keyword].value = placeholder
    ds.save_as(dst)
    data = dst.read_bytes()
    tag = struct.pack("<HH", el.tag.group, el.tag.element) + el.VR.encode() + struct.pack("<H", len(raw))
    assert data.count(tag + placeholder.encode()) == 1
    dst.write_bytes(data.replace(tag + placeholder.encode(), tag + raw))


def _with_value(src, dst, keyword: str, value) -> None:
    """Copy ``src`` with one attribute set to ``value`` (None: removed)."""
    ds = pydicom.dcmread(src)
    if value is None:
        del ds[keyword]
    else:
        setattr(ds, keyword, value)
    ds.save_as(dst)


#: (file name, source, how, keyword, value, what the reason must say). Every field the reader uses.
BAD_HEADERS = [
    ("frames-ab", YBR, "raw", "NumberOfFrames", b"ab", "NumberOfFrames 'ab' is not a whole number >= 1"),
    ("frames-ab-native", "multi", "raw", "NumberOfFrames", b"ab", "NumberOfFrames 'ab' is not a whole number"),
    ("frames-negative", YBR, "raw", "NumberOfFrames", b"-3", "NumberOfFrames '-3' is not a whole number"),
    ("frames-zero", "multi", "raw", "NumberOfFrames", b"0 ", "NumberOfFrames '0' is not a whole number"),
    ("frames-fraction", YBR, "raw", "NumberOfFrames", b"1.5 ", "NumberOfFrames '1.5' is not a whole number"),
    ("frames-empty", YBR, "raw", "NumberOfFrames", b"  ", "NumberOfFrames '' is not a whole number"),
    ("frames-huge", YBR, "raw", "NumberOfFrames", b"99999999", "99999999 frame(s) of 240x320x3 at 8 bits need at least"),
    ("frames-more-than-stored", "multi", "raw", "NumberOfFrames", b"40", "40 frame(s) of 240x320x3 at 8 bits need at least"),
    ("rows-zero", RGB, "set", "Rows", 0, "Rows '0' is not a whole number >= 1"),
    ("rows-huge", RGB, "set", "Rows", 65535, "1 frame(s) of 65535x320x3 at 8 bits need at least"),
    ("rows-missing", RGB, "set", "Rows", None, "DICOM file has no image"),
    ("columns-zero", "multi", "set", "Columns", 0, "Columns '0' is not a whole number >= 1"),
    ("columns-missing", RGB, "set", "Columns", None, "DICOM file has no image"),
    ("bits-12", RGB, "set", "BitsAllocated", 12, "BitsAllocated 12 is not 1, 8, 16, 32 or 64"),
    ("bits-64", RGB, "set", "BitsAllocated", 64, "at 64 bits need at least"),
    ("bits-missing", RGB, "set", "BitsAllocated", None, "BitsAllocated is missing"),
    ("bits-stored-99", RGB, "set", "BitsStored", 99, "BitsStored 99 exceeds BitsAllocated 8"),
    ("bits-stored-missing", PALETTE, "set", "BitsStored", None, "BitsStored is missing"),
    ("photometric-unknown", RGB, "set", "PhotometricInterpretation", "XYZ", "unsupported PhotometricInterpretation 'XYZ'"),
    ("photometric-mono-on-rgb", RGB, "set", "PhotometricInterpretation", "MONOCHROME2",
     "PhotometricInterpretation MONOCHROME2 needs SamplesPerPixel 1, the file says 3"),
    ("photometric-missing", RGB, "set", "PhotometricInterpretation", None, "DICOM file has no image"),
    ("palette-without-lut", PALETTE, "set", "RedPaletteColorLookupTableDescriptor", None, "PALETTE COLOR image without its palette"),
    ("samples-1-on-rgb", RGB, "set", "SamplesPerPixel", 1, "PhotometricInterpretation RGB needs SamplesPerPixel 3, the file says 1"),
    ("samples-zero", YBR, "set", "SamplesPerPixel", 0, "SamplesPerPixel '0' is not a whole number >= 1"),
    ("samples-missing", RGB, "set", "SamplesPerPixel", None, "SamplesPerPixel is missing"),
    ("planar-7", RGB, "set", "PlanarConfiguration", 7, "PlanarConfiguration 7 is not 0 or 1"),
    ("pixels-missing", RGB, "set", "PixelData", None, "the file has"),
]


@pytest.fixture(scope="module")
def fuzzed_site(tmp_path_factory):
    """good/: three real files (one a 3-frame native file); bad/: one file per broken header field,
    a truncated file, a header cut short, and a YBR file claiming 40 frames whose pixels hold 30."""
    root = tmp_path_factory.mktemp("fuzzed")
    (root / "good").mkdir()
    (root / "bad").mkdir()
    multi = root / "source-multi.dcm.src"
    _native_multiframe(multi)
    sources = {RGB: get_testdata_file(RGB), PALETTE: get_testdata_file(PALETTE), YBR: get_testdata_file(YBR), "multi": multi}
    (root / "good" / "rgb.dcm").write_bytes(open(sources[RGB], "rb").read())
    (root / "good" / "palette.dcm").write_bytes(open(sources[PALETTE], "rb").read())
    (root / "good" / "multi.dcm").write_bytes(multi.read_bytes())
    for name, src, how, keyword, value, _ in BAD_HEADERS:
        (_with_raw_value if how == "raw" else _with_value)(sources[src], root / "bad" / f"{name}.dcm", keyword, value)
    whole = open(sources[RGB], "rb").read()
    (root / "bad" / "truncated-pixels.dcm").write_bytes(whole[: len(whole) // 2])
    (root / "bad" / "truncated-header.dcm").write_bytes(whole[:300])
    _with_raw_value(sources[YBR], root / "bad" / "frames-40-of-30.dcm", "NumberOfFrames", b"40")
    return root


def test_every_broken_header_field_is_one_problem_naming_the_file(fuzzed_site):
    data = open_data(f"dicom:{fuzzed_site}")  # must not raise
    reasons = {}
    for p in data.problems:
        name = p.path.split("/")[-1]
        assert name not in reasons, f"{name} reported twice"
        assert p.path.startswith(str(fuzzed_site))
        reasons[name] = p.reason
    for name, *_, expected in BAD_HEADERS:
        assert expected in reasons.get(f"{name}.dcm", "(not reported)"), (name, reasons.get(f"{name}.dcm"))
    assert "need at least" in reasons["truncated-pixels.dcm"]
    assert reasons["truncated-header.dcm"].startswith(("not a readable DICOM file", "DICOM file has no image"))
    assert len(reasons) == len(BAD_HEADERS) + 2
    # the good files, and the 40-frame file (its header is plausible), are listed
    keys = {s.key.split("#")[0] for s in data.samples}
    assert keys == {"good/rgb.dcm", "good/palette.dcm", "good/multi.dcm", "bad/frames-40-of-30.dcm"}
    assert all(s.image().dtype == np.uint8 for s in data.samples if s.key.startswith("good/"))


def test_site_check_counts_fuzzed_files_and_frames_that_fail_to_decode(fuzzed_site):
    from echocare.data.sitecheck import check_site

    report = check_site(open_data(f"dicom:{fuzzed_site}"))
    # 1 + 1 + 3 good frames and the 30 real frames of the 40 the broken file claims
    assert report.readable == 5 + 30 and report.listed == 5 + 40
    frame_problems = [p for p in report.problems if p.path.endswith("frames-40-of-30.dcm")]
    assert [p.reason.split(":")[0] for p in frame_problems] == [f"frame {i}" for i in range(30, 40)]
    assert all("cannot decode DICOM pixels" in p.reason for p in frame_problems)
    assert report.problem_files == len(BAD_HEADERS) + 3
    assert any(f"{len(report.problems)} problem(s) in {report.problem_files} file(s)" in w for w in report.warnings)


def test_pixel_size_comes_from_a_sane_calibration_region_only(tmp_path):
    """Every malformed calibration only loses the pixel size; the image still reads."""
    src = tmp_path / "calibrated.dcm.src"
    ds = pydicom.dcmread(get_testdata_file(YBR))
    assert ds.SequenceOfUltrasoundRegions[0].RegionLocationMaxX1 >= ds.Columns  # drawn for another resolution: distrusted
    assert "pixel_size_mm" not in open_data(f"dicom:{get_testdata_file(YBR)}?frames=1").samples[0].meta
    region = ds.SequenceOfUltrasoundRegions[0]
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 300, 230  # now inside the 320 x 240 frames
    ds.save_as(src)
    good = open_data(f"dicom:{src}?frames=1").samples[0].meta.get("pixel_size_mm")
    assert good == pytest.approx(float(region.PhysicalDeltaX) * 10)  # the file's calibration, cm -> mm
    broken = {
        "delta-nan": ("PhysicalDeltaX", float("nan")), "delta-inf": ("PhysicalDeltaX", float("inf")),
        "delta-negative": ("PhysicalDeltaX", -0.01), "delta-zero": ("PhysicalDeltaX", 0.0),
        "anisotropic": ("PhysicalDeltaY", float(region.PhysicalDeltaX) * 3), "units-not-cm": ("PhysicalUnitsXDirection", 4),
        "units-missing": ("PhysicalUnitsXDirection", None), "delta-missing": ("PhysicalDeltaX", None),
        "region-too-big": ("RegionLocationMaxX1", 5000), "no-regions": ("SequenceOfUltrasoundRegions", "empty"),
    }
    for name, (keyword, value) in broken.items():
        ds = pydicom.dcmread(src)
        if value == "empty":
            ds.SequenceOfUltrasoundRegions = []
        elif value is None:
            del ds.SequenceOfUltrasoundRegions[0][keyword]
        else:
            setattr(ds.SequenceOfUltrasoundRegions[0], keyword, value)
        ds.save_as(tmp_path / f"{name}.dcm")
    data = open_data(f"dicom:{tmp_path}?frames=1")
    assert not data.problems and len(data) == len(broken)
    for s in data.samples:
        assert "pixel_size_mm" not in s.meta, s.key
        assert s.image().shape == (240, 320, 3)


def test_garbage_patient_fields_are_neither_read_nor_a_problem(tmp_path):
    ds = pydicom.dcmread(get_testdata_file(RGB))
    ds.PatientID = "\x01\x02" * 30 + "SECRET-0815"
    ds.PatientName = "Ünïcödé^Ærgh" * 10
    dst = tmp_path / "patient.dcm"
    ds.save_as(dst)
    data = open_data(f"dicom:{dst}")
    assert not data.problems and len(data) == 1 and data.samples[0].image().shape == (240, 320, 3)
    assert "0815" not in repr(data.samples[0].meta) + data.samples[0].key
