"""The task-model checkpoint: save/load round trip, sha256 pinning, atomic writes, torch-free spec."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from echocare.models import task_model as tm
from echocare.models.encoder import CheckpointError, build_encoder, sha256_file
from echocare.models.heads import build_head, head_kwargs_of
from echocare.models.task_model import TaskModel, TaskModelSpec, load_task_model, read_task_model_spec, save_task_model
from echocare.preprocess import PreprocessSpec

TINY = "echocare-tiny"


def _trained_head(task: str, n: int, **kw) -> torch.nn.Module:
    """A head with non-default weights (as if trained), so a failed load cannot pass by accident."""
    head = build_head(task, TINY, n, **kw)
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return head


def _spec(task: str, labels: list[str], head: torch.nn.Module, checkpoint: str | None = None, sha: str | None = None) -> TaskModelSpec:
    return TaskModelSpec(
        encoder_config=TINY,
        encoder_checkpoint=checkpoint,
        encoder_sha256=sha,
        encoder_seed=5,
        task=task,
        labels=labels,
        head=head_kwargs_of(head),
        preprocess=PreprocessSpec(size=256).to_dict(),
        provenance={"sites": ["a", "b"], "rounds": 3, "epsilon_per_site": {"a": 2.5, "b": 3.1}},
    )


@pytest.fixture(scope="module")
def encoder_ckpt(tmp_path_factory) -> Path:
    sd = build_encoder(TINY, seed=11).state_dict()
    sd["mask_token"] = torch.zeros(1, 1, 24)
    path = tmp_path_factory.mktemp("enc") / "echocare_encoder.pth"
    torch.save(sd, path)
    return path


def test_classify_round_trip_gives_identical_outputs(tmp_path):
    from echocare.models.encoder import load_encoder

    head = _trained_head("classify", 3, hidden=16)
    spec = _spec("classify", ["benign", "malignant", "normal"], head)
    save_task_model(tmp_path / "m", spec, head.state_dict())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["head.safetensors", "model.json"]

    model, spec2 = load_task_model(tmp_path / "m")
    assert spec2 == spec and isinstance(model, TaskModel) and not model.training
    original = TaskModel(load_encoder(TINY, None, seed=5)[0], head, "classify").eval()
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=0)
        assert model(x).shape == (2, 3)


def test_segment_round_trip_with_pinned_encoder_checkpoint(tmp_path, encoder_ckpt):
    from echocare.models.encoder import load_encoder

    head = _trained_head("segment", 2, variant="light")
    spec = _spec("segment", ["background", "lesion"], head, checkpoint=str(encoder_ckpt))  # sha filled in on save
    save_task_model(tmp_path / "m", spec, head.state_dict())
    assert read_task_model_spec(tmp_path / "m").encoder_sha256 == sha256_file(encoder_ckpt)

    model, _ = load_task_model(tmp_path / "m")
    original = TaskModel(load_encoder(TINY, encoder_ckpt)[0], head, "segment").eval()
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, 2, 256, 256)
        torch.testing.assert_close(out, original(x), rtol=0, atol=0)


def test_changed_encoder_checkpoint_is_refused(tmp_path, encoder_ckpt):
    ckpt = tmp_path / "enc.pth"
    ckpt.write_bytes(encoder_ckpt.read_bytes())
    head = _trained_head("hc", 2)
    save_task_model(tmp_path / "m", _spec("hc", ["background", "head"], head, checkpoint=str(ckpt)), head.state_dict())
    torch.save(build_encoder(TINY, seed=12).state_dict(), ckpt)  # same layout, other weights
    with pytest.raises(CheckpointError, match="sha256 .* differs"):
        load_task_model(tmp_path / "m")


def test_modified_head_file_is_refused(tmp_path):
    head = _trained_head("classify", 2)
    save_task_model(tmp_path / "m", _spec("classify", ["neg", "pos"], head), head.state_dict())
    f = tmp_path / "m" / "head.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="head.safetensors: sha256 differs"):
        load_task_model(tmp_path / "m")


def test_head_state_must_match_the_spec_before_anything_is_written(tmp_path):
    head = _trained_head("classify", 3)
    spec = _spec("classify", ["a", "b"], head)  # 2 labels, 3-class weights
    with pytest.raises(CheckpointError, match="shape mismatch"):
        save_task_model(tmp_path / "m", spec, head.state_dict())
    assert not (tmp_path / "m" / "model.json").exists()


def test_opacus_prefix_is_stripped_and_float64_is_stored_as_float32(tmp_path):
    head = _trained_head("classify", 2)
    state = {f"_module.{k}": v.double() for k, v in head.state_dict().items()}
    save_task_model(tmp_path / "m", _spec("classify", ["neg", "pos"], head), state)
    model, _ = load_task_model(tmp_path / "m")
    for k, v in head.state_dict().items():
        assert model.head.state_dict()[k].dtype == torch.float32
        torch.testing.assert_close(model.head.state_dict()[k], v)


def test_crash_while_saving_keeps_the_previous_model(tmp_path, monkeypatch):
    first = _trained_head("classify", 2)
    spec = _spec("classify", ["neg", "pos"], first)
    save_task_model(tmp_path / "m", spec, first.state_dict())
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    real = tm._atomic_write_bytes

    def crash_on_json(target: Path, data: bytes) -> Path:
        if target.name == tm.SPEC_FILE:
            raise OSError("disk full")
        return real(target, data)

    monkeypatch.setattr(tm, "_atomic_write_bytes", crash_on_json)
    second = _trained_head("classify", 2)
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(-1)
    with pytest.raises(OSError, match="disk full"):
        save_task_model(tmp_path / "m", spec, second.state_dict())
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # no temp files left either
    monkeypatch.undo()
    model, _ = load_task_model(tmp_path / "m")
    torch.testing.assert_close(model.head.state_dict()["net.0.weight"], first.state_dict()["net.0.weight"])


def test_only_the_head_trains():
    head = build_head("segment", TINY, 2)
    model = TaskModel(build_encoder(TINY), head, "segment")
    model.train()
    assert model.head.training and not model.encoder.training
    out = model(torch.randn(1, 3, 256, 256))
    torch.nn.functional.cross_entropy(out, torch.zeros(1, 256, 256, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(TypeError, match="ClassifyHead"):
        TaskModel(build_encoder(TINY), head, "classify")


def test_spec_is_readable_without_torch(tmp_path):
    head = _trained_head("hc", 2)
    save_task_model(tmp_path / "m", _spec("hc", ["background", "head"], head), head.state_dict())
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from echocare.models.task_model import read_task_model_spec\n"
        f"s = read_task_model_spec({str(tmp_path / 'm')!r})\n"
        "print(s.task, s.labels, s.head['variant'], s.preprocess_spec().size, s.provenance['epsilon_per_site']['b'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["hc", "['background',", "'head']", "light", "256", "3.1"]


def test_bad_spec_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.json"):
        read_task_model_spec(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json: not readable JSON"):
        read_task_model_spec(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "echofleet-task-model", "encoder_config": TINY}))
    with pytest.raises(ValueError, match="lacks encoder_checkpoint, encoder_sha256"):
        read_task_model_spec(tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        TaskModelSpec(TINY, None, None, task="detect")
