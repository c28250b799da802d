"""Task heads: output shapes for every task/variant, JSON round trip, Opacus compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from echocare.models.encoder import get_config
from echocare.models.heads import ClassifyHead, SegmentHead, build_head, head_kwargs_of, num_outputs

TINY = get_config("echocare-tiny")


def _maps(cfg, n: int, size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, c, h, w, generator=g) for c, h, w in cfg.feature_shapes(size)]


@pytest.mark.parametrize("hidden,dropout", [(0, 0.0), (64, 0.2)])
def test_classify_head_shapes_and_layers(hidden, dropout):
    head = build_head("classify", TINY, 3, hidden=hidden, dropout=dropout)
    assert isinstance(head, ClassifyHead) and head.in_dim == sum(TINY.feature_channels)
    assert head(torch.randn(5, head.in_dim)).shape == (5, 3)
    kinds = {type(m) for m in head.modules()} - {ClassifyHead, nn.Sequential}
    assert kinds <= {nn.Linear, nn.GELU, nn.Dropout}, kinds  # what Opacus ghost clipping handles
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == (2 if hidden else 1)


def test_classify_head_on_selected_stages():
    head = build_head("classify", TINY, 2, stages=[3, 4])
    assert head.needs == (3, 4) and head.in_dim == TINY.feature_channels[3] + TINY.feature_channels[4]


@pytest.mark.parametrize(
    "task,variant,n_out", [("segment", "light", 3), ("segment", "unetr", 2), ("hc", "light", 2), ("hc", "unetr", 2)]
)
def test_segment_heads_output_at_input_resolution(task, variant, n_out):
    head = build_head(task, TINY, n_out, variant=variant)
    assert isinstance(head, SegmentHead) and num_outputs(head) == n_out
    maps = _maps(TINY, 2, 256)
    image = torch.randn(2, 3, 256, 256)
    needed = [maps[i] for i in head.needs]
    out = head(needed, image if head.needs_image else None)
    assert out.shape == (2, n_out, 256, 256)
    if variant == "light":
        assert head.needs == (2, 3, 4) and not head.needs_image
        assert torch.allclose(head(needed, image), out)  # the image only sets the output size
    else:
        assert head.needs == (0, 1, 2, 3, 4) and head.needs_image
        with pytest.raises(ValueError, match="needs the input image"):
            head(needed, None)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in head.modules())


def test_heads_for_the_official_config():
    cfg = get_config("echocare")
    light = build_head("segment", cfg, 2)
    assert light.variant == "light"  # the CPU default
    maps = _maps(cfg, 1, 64)
    assert light([maps[i] for i in light.needs]).shape == (1, 2, 64, 64)
    unetr = build_head("segment", cfg, 2, variant="unetr")
    assert unetr.feature_size == 48
    assert unetr(maps, torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    assert build_head("classify", cfg, 3).in_dim == 3968


def test_head_kwargs_round_trip_through_json():
    for task, n, kw in [
        ("classify", 3, {"hidden": 32, "dropout": 0.1, "stages": [2, 4]}),
        ("classify", 2, {}),
        ("segment", 2, {"variant": "unetr", "feature_size": 12}),
        ("hc", 2, {}),
    ]:
        head = build_head(task, TINY, n, **kw)
        kwargs = json.loads(json.dumps(head_kwargs_of(head)))
        again = build_head(task, TINY, n, **kwargs)
        assert head_kwargs_of(again) == head_kwargs_of(head)
        a, b = head.state_dict(), again.state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_bad_head_requests_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task"):
        build_head("detect", TINY, 2)
    with pytest.raises(ValueError, match="variant"):
        build_head("segment", TINY, 2, variant="deeplab")
    with pytest.raises(ValueError, match="hc head is binary"):
        build_head("hc", TINY, 1)
    with pytest.raises(ValueError, match="unknown classify head options"):
        build_head("classify", TINY, 2, variant="light")
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_head("classify", TINY, 1)


def _per_sample_grads_match(head: nn.Module, inputs: list[torch.Tensor], target: torch.Tensor, forward) -> None:
    """Opacus' per-sample gradients equal the gradients of each sample computed on its own
    (in float64, so that the comparison is about the wiring, not rounding)."""
    from opacus import GradSampleModule

    head = head.double()
    inputs = [x.double() for x in inputs]

    gsm = GradSampleModule(head, loss_reduction="sum")
    loss = nn.functional.cross_entropy(forward(gsm, *inputs), target, reduction="sum")
    loss.backward()
    params = [p for p in head.parameters() if p.requires_grad]
    per_sample = [p.grad_sample.clone() for p in params]
    assert all(g.shape[0] == target.shape[0] for g in per_sample)
    gsm._close()  # remove the hooks before the reference computation
    for i in range(target.shape[0]):
        li = nn.functional.cross_entropy(forward(head, *[x[i : i + 1] for x in inputs]), target[i : i + 1], reduction="sum")
        grads = torch.autograd.grad(li, params)
        for gs, g in zip(per_sample, grads):
            torch.testing.assert_close(gs[i], g, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_opacus_per_sample_gradients_are_exact_for_every_head():
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    cls = build_head("classify", TINY, 3, hidden=16)
    assert ModuleValidator.validate(cls, strict=False) == []
    _per_sample_grads_match(cls, [torch.randn(3, cls.in_dim)], torch.tensor([0, 2, 1]), lambda m, x: m(x))

    size = 64  # small maps keep this quick; the wiring is the same at 256
    for variant in ("light", "unetr"):
        head = build_head("segment", TINY, 2, variant=variant, feature_size=12)
        assert ModuleValidator.validate(head, strict=False) == []
        maps = [m[:2] for m in _maps(TINY, 2, size)]
        inputs = [torch.randn(2, 3, size, size)] + [maps[i] for i in head.needs]
        target = torch.randint(0, 2, (2, size, size))
        _per_sample_grads_match(head, inputs, target, lambda m, img, *ms: m(list(ms), img))


def test_last_stage_pooling_option():
    """``pooling="last"``: the stride-32 map only (the FETUS baseline); default unchanged (all five)."""
    from echocare.models.encoder import build_encoder, encode, pooled_columns, pooled_features
    from echocare.models.task_model import TaskModel

    assert build_head("classify", TINY, 3).needs == (0, 1, 2, 3, 4)
    head = build_head("classify", TINY, 3, pooling="last")
    assert head.needs == (4,) and head.in_dim == TINY.feature_channels[4]
    again = build_head("classify", TINY, 3, **json.loads(json.dumps(head_kwargs_of(head))))
    assert again.needs == (4,) and again.in_dim == head.in_dim
    assert build_head("classify", TINY, 3, pooling="all", stages=[0, 1, 2, 3, 4]).needs == (0, 1, 2, 3, 4)
    model = TaskModel(build_encoder(TINY), head, "classify").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.features(x)
        assert len(maps) == 1 and torch.allclose(model(x), head(maps[0].mean(dim=(-2, -1))))
        # the all-five feature cache serves a last-stage head through pooled_columns
        every = pooled_features(encode(model.encoder, x))
        assert torch.allclose(head(every[:, pooled_columns(TINY, head.stages)]), model(x))
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        build_head("classify", TINY, 3, pooling="max")
    with pytest.raises(ValueError, match="contradicts stages"):
        build_head("classify", TINY, 3, pooling="last", stages=[3, 4])
