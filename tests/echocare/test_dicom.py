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
