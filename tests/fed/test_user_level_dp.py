"""The unit of privacy is the patient where the site knows its patients (issue 9, docs/privacy.md).

The mechanism tests call the production DP-SGD path (``fed.dp.train_head`` with ``units``) and
measure what one patient can change in a released step: at most the clipping bound C, however many
images the patient has (per-image clipping would let k images move it by k*C). The site tests run
``fed.task.train_round`` / ``evaluate_round`` on phantom images listed in a CSV with a ``patient``
column, and read the lifetime ledger as an auditor does.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from fed.dp import DPConfig, DPRandom, train_head

warnings.filterwarnings("ignore", category=UserWarning)

C = 0.5


def _head(hidden: bool, d: int, k: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if hidden:
        return torch.nn.Sequential(torch.nn.Linear(d, 6), torch.nn.GELU(), torch.nn.Linear(6, k))
    return torch.nn.Linear(d, k)


def _released_sum(hidden: bool, x: torch.Tensor, y: torch.Tensor, units: torch.Tensor | None) -> torch.Tensor:
    """One production DP-SGD step with every unit sampled (batch_size >= units: q = 1), lr 1 and
    negligible noise: the released sum of clipped gradients, flat."""
    head = _head(hidden, x.shape[1], 3)
    before = torch.cat([p.detach().flatten().clone() for p in head.parameters()])
    n_units = len(y) if units is None else len(torch.unique(units))
    stats = train_head(head, x, y, DPConfig(epochs=1, batch_size=10_000, lr=1.0, max_grad_norm=C, noise_multiplier=1e-7,
                                            fast_linear=False), units=units)
    assert stats["sample_rate"] == 1.0 and stats["steps"] == 1
    after = torch.cat([p.detach().flatten() for p in head.parameters()])
    return (before - after) * n_units  # SGD: new = old - (clipped sum + noise) / (q * units)


def _patients(seed: int = 0, k: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """20 patients of 2 images each, and patient 20 with ``k`` near-identical images (one cine loop):
    their gradients point the same way, so per-image clipping would let that patient move a step by k*C."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 12, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    loop = torch.randn(1, 12, generator=g) * 3 + 0.01 * torch.randn(k, 12, generator=g)
    x = torch.cat([x, loop])
    y = torch.cat([y, torch.full((k,), 2)])
    units = torch.cat([torch.arange(40) // 2, torch.full((k,), 20)])
    return x, y, units


@pytest.mark.parametrize("hidden", [False, True], ids=["linear", "hidden"])
def test_a_patient_with_k_images_moves_the_release_by_at_most_c(hidden):
    x, y, units = _patients()
    others = units != 20
    with_patient = _released_sum(hidden, x, y, units)
    without = _released_sum(hidden, x[others], y[others], units[others])
    moved = float((with_patient - without).norm())
    assert moved <= C * (1 + 1e-3), moved
    assert moved > 0.5 * C  # the patient does count (its summed gradient is clipped, not dropped)
    # the same data accounted per image: the 8 images of that patient move the step by ~8 C
    per_image = float((_released_sum(hidden, x, y, None) - _released_sum(hidden, x[others], y[others], None)).norm())
    assert per_image > 4 * C, per_image


def test_patients_are_sampled_at_the_patient_rate(monkeypatch):
    """Poisson sampling over patients at q = B / patients, for epochs * ceil(patients / B) steps; a
    sampled patient brings all its images (never some of them)."""
    calls: list[tuple[int, float]] = []
    seen: list[torch.Tensor] = []
    real = DPRandom.poisson_batch

    def spy(self, n, q):
        calls.append((n, q))
        return real(self, n, q)

    monkeypatch.setattr(DPRandom, "poisson_batch", spy)
    from fed import dp

    real_sum = dp.unit_clipped_sum

    def spy_sum(model, params, xs, y, units, *rest):
        seen.append(units.clone())
        return real_sum(model, params, xs, y, units, *rest)

    monkeypatch.setattr(dp, "unit_clipped_sum", spy_sum)
    x, y, units = _patients()
    stats = train_head(_head(False, 12, 3), x, y, DPConfig(epochs=2, batch_size=5, noise_multiplier=1.0), units=units)
    assert stats["unit"] == "patient" and stats["sample_rate"] == pytest.approx(5 / 21)
    assert stats["steps"] == 2 * 5 and calls == [(21, pytest.approx(5 / 21))] * 10
    sizes = torch.bincount(units)
    for batch in seen:  # every sampled patient with all of its images
        got = torch.bincount(batch, minlength=len(sizes))
        assert torch.equal(got[got > 0], sizes[got > 0])


def test_an_overflowing_image_of_one_patient_contributes_nothing():
    """A crafted hidden head that overflows for one image: that image's gradient is zero, the rest of
    its patient still counts, and the release stays finite (one image does not decide it)."""
    x, y, units = _patients()
    x[0, 0] = 1e30
    head = _head(True, 12, 3)
    with torch.no_grad():
        head[0].weight[:, 0] = 1e10  # image 0's hidden units overflow to inf
    train_head(head, x, y, DPConfig(epochs=1, batch_size=10_000, lr=1.0, max_grad_norm=C, noise_multiplier=1.0,
                                    fast_linear=False), units=units)
    assert all(torch.isfinite(p).all() for p in head.parameters())


# -- the site: patients from the data, accounted per patient ---------------------------------------
N_PATIENTS, PER_PATIENT = 10, 3


@pytest.fixture(scope="module")
def patient_csv(tmp_path_factory) -> Path:
    """30 phantom images of 10 patients (3 each, same label) listed in a CSV with a patient column."""
    from echocare.phantom import write_phantoms

    root = tmp_path_factory.mktemp("patients")
    manifest = write_phantoms(root / "images", N_PATIENTS * PER_PATIENT, profiles="linear-a,convex-b,linear-c", seed=0)
    by_label: dict[str, list[str]] = {}
    for rel, info in sorted(manifest["files"].items()):
        by_label.setdefault(info["label"], []).append(rel)
    rows, patient = [], 0
    for label, files in sorted(by_label.items()):
        for i in range(0, len(files) - len(files) % PER_PATIENT, PER_PATIENT):
            rows += [(f"images/{f}", label, f"P{patient:03d}") for f in files[i:i + PER_PATIENT]]
            patient += 1
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cache(phantom_feature_cache) -> str:
    """The session's phantom feature cache: the CSV lists phantom images (same pixels, same keys)."""
    return phantom_feature_cache


def _policy(tmp_path: Path, data: str, cache: str, **kw):
    from fed.policy import SitePolicy

    return SitePolicy(**{"data": data, "site_name": "hospital-p", "state_dir": str(tmp_path / "state"), "cache_dir": cache,
                         "target_epsilon": 1000.0, **kw})


def _cfg(**kw):
    from fed.task import RoundConfig

    return RoundConfig(**{"head": {}, "local_epochs": 1, "batch_size": 4, "lr": 0.5, "max_grad_norm": 0.5,
                          "noise_multiplier": 1.0, "num_rounds": 2, "seed": 0, "run_key": "run-p", **kw})


def _weights(cache: str) -> dict[str, np.ndarray]:
    """A plain linear head (no fixed projection: nothing for the site to verify before evaluating)."""
    from echocare.models.encoder import get_config
    from echocare.models.heads import build_head

    torch.manual_seed(0)
    head = build_head("classify", get_config("echocare-tiny"), 3)
    return {k: v.detach().numpy().copy() for k, v in head.state_dict().items()}


def _ledger(policy) -> dict:
    from fed.ledger import PrivacyLedger

    return PrivacyLedger.load(policy.ledger_path).to_dict()


def test_a_site_that_knows_its_patients_trains_and_accounts_per_patient(tmp_path, patient_csv, cache):
    from fed.task import evaluate_round, site_split, train_round

    policy = _policy(tmp_path, f"csv:{patient_csv}", cache)
    cfg = _cfg()
    w = _weights(cache)
    reply = train_round(policy, cfg, w)
    assert reply.status == "ok", reply.reason
    assert reply.unit == "patient"
    assert evaluate_round(policy, cfg, w).unit == "patient"
    train = site_split(policy, cfg, "train").samples
    train_patients = len({s.meta["patient"] for s in train})
    assert train_patients < len(train)  # the patients have several images each
    book = _ledger(policy)
    assert book["unit"] == "patient" and [r["unit"] for r in book["releases"]] == ["patient", "patient"]
    release = book["releases"][0]
    # Sampled and stepped by the size class of the site's patients (10, train and validation: class 9 at
    # 4 per doubling), not of its 30 images (class 26), not of the exact training patients.
    from fed.policy import size_class

    public = size_class(N_PATIENTS, policy.size_classes_per_doubling)
    assert public == 9 and size_class(3 * N_PATIENTS, policy.size_classes_per_doubling) != public
    assert release["sample_rate"] == pytest.approx(cfg.batch_size / public)  # patients' class, not images'
    assert release["steps"] == -(-public // cfg.batch_size)
    assert book["delta"] <= 1.0 / N_PATIENTS and book["delta"] in (1e-5, 1e-6, 1e-7)  # on the grid: N not revealed
    # the coordinator sees the unit as a word in the reply, nothing more
    from fed.client_app import to_content

    site = to_content(reply).config_records["site"]
    assert site["privacy-unit"] == "patient"


def test_the_policy_can_ask_for_images_or_demand_patients(tmp_path, patient_csv, cache):
    from fed.task import NO_PATIENTS, train_round

    w = _weights(cache)
    per_image = _policy(tmp_path / "a", f"csv:{patient_csv}", cache, privacy_unit="image")
    reply = train_round(per_image, _cfg(), w)
    assert reply.status == "ok" and reply.unit == "image"
    assert _ledger(per_image)["releases"][0]["unit"] == "image"
    # per-patient privacy on data that names no patients: refused, nothing charged
    phantoms = _policy(tmp_path / "b", "phantom:30?profiles=linear-a,convex-b,linear-c&seed=0", cache, privacy_unit="patient")
    refused = train_round(phantoms, _cfg(), w)
    assert refused.status == "refused" and refused.reason == NO_PATIENTS
    assert not phantoms.ledger_path.exists()
    # a ledger that began per image cannot take a per-patient release (they do not compose)
    switched = _policy(tmp_path / "a", f"csv:{patient_csv}", cache, privacy_unit="patient")
    mixed = train_round(switched, _cfg(server_round=2), w)
    assert mixed.status == "refused" and "accounts per image" in mixed.reason
    assert len(_ledger(switched)["releases"]) == 1


def test_per_patient_evaluation_clips_each_patients_rows_to_one_images_bound():
    from fed.task import unit_rows

    rows = torch.ones(6, 4, dtype=torch.float64)  # each image's row has norm 2
    units = np.array([0, 0, 0, 1, 2, 2])
    out = unit_rows(rows, units, bound=2.0)
    assert out.shape == (3, 4)
    assert torch.allclose(out.norm(dim=1), torch.full((3,), 2.0, dtype=torch.float64))
    assert unit_rows(rows, None, 2.0) is rows  # per image: unchanged


def test_the_model_card_states_the_unit():
    from server.coordinator.report import build_report, model_card

    run = {"task": "classify", "labels": ["a", "b"], "encoder": {"config": "echocare-tiny", "seed": 0}, "head": {},
           "strategy": "fedavg", "rounds_completed": 1, "num_rounds": 1, "dp": {"max_grad_norm": 1.0, "target_epsilon": 8.0}}
    site = {"epsilon": 1.0, "delta": 1e-5, "status": "ok"}
    both = build_report(run, {1: {"train": {"h1": {**site, "privacy_unit": "patient"}, "h2": {**site, "privacy_unit": "patient"}}}})
    assert both["rounds"][0]["sites"]["h1"]["privacy"]["unit"] == "patient"
    assert "at the level of one patient (user-level DP" in model_card(both)
    mixed = build_report(run, {1: {"train": {"h1": {**site, "privacy_unit": "patient"}, "h2": site}}})
    card = model_card(mixed)
    assert "one patient at h1 and of one training image at the other sites" in card and "| h2 | per image |" in card


def test_dicom_files_of_one_patient_share_a_pseudonym_and_no_identifier_is_kept(tmp_path):
    """DICOM PatientID is read only to form a site-local pseudonym: files of one patient are one unit."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    from echocare.data import open_data
    from fed.task import patient_ids

    def write(path: Path, patient: str) -> None:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = UltrasoundImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.Modality, ds.PatientID, ds.PatientName = "US", patient, "Doe^Jane"
        ds.set_pixel_data(np.tile(np.arange(64, dtype=np.uint8), (16, 1)), "MONOCHROME2", bits_stored=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)

    write(tmp_path / "a" / "1.dcm", "MRN-4711")
    write(tmp_path / "a" / "2.dcm", "MRN-4711")  # a follow-up of the same patient
    write(tmp_path / "b" / "3.dcm", "MRN-0815")
    data = open_data(f"dicom:{tmp_path}")
    by_key = {s.key: s for s in data.samples}
    assert by_key["a/1.dcm"].meta["patient"] == by_key["a/2.dcm"].meta["patient"] != by_key["b/3.dcm"].meta["patient"]
    assert by_key["a/1.dcm"].group == by_key["a/2.dcm"].group  # one split for the patient's files
    for s in data.samples:
        assert "4711" not in repr(s.meta) + s.key + str(s.group) and "0815" not in repr(s.meta) + str(s.group)
    assert sorted(np.bincount(patient_ids(data.samples)).tolist()) == [1, 2]  # two patients: 2 files and 1
    assert pydicom  # (imported for the skip)
