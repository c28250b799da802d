"""Export-time rewrites of MONAI's Swin stages (edge/build/rewrites.py): same numbers, leaner graph.

A small MONAI SwinTransformer (the encoder's own class, ``use_v2=True`` as EchoCare) at 64x64 with
window 4 has shifted and unshifted blocks in three stages and an unshifted 4x4 last stage; the
rewritten copy must give MONAI's outputs, and dropping or misplacing any piece (shift mask, shift,
the folded scale) must show as a difference. Each test takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge.build import rewrites as R


@pytest.fixture(scope="module")
def swin() -> torch.nn.Module:
    from monai.networks.nets.swin_unetr import SwinTransformer

    torch.manual_seed(0)
    m = SwinTransformer(in_chans=3, embed_dim=16, window_size=(4, 4), patch_size=(2, 2), depths=(2, 2, 2, 2),
                        num_heads=(1, 2, 2, 4), spatial_dims=2, use_v2=True, qkv_bias=True).eval()
    with torch.no_grad():  # relative position bias tables are ~N(0, 0.02) at init: make them matter
        for name, p in m.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 1.0)
    return m


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return max(float((u - v).abs().max()) for u, v in zip(a(x), b(x)))


def test_rewritten_stages_equal_monai_shifted_and_unshifted(swin) -> None:
    blocks = [blk for name in R.rewritable_stages(swin) for blk in swin.get_submodule(name).blocks]
    assert len(R.rewritable_stages(swin)) == 4 and sum(any(b.shift_size) for b in blocks) == 4
    rw = R.rewrite_for_export(swin, 64)
    assert all(type(rw.get_submodule(n)).__name__ == "WindowOrderStage" for n in R.rewritable_stages(swin))
    # one gather between consecutive blocks' window orders, none where the order does not change:
    # the first stage (32x32) enters, switches and leaves; the last (4x4 = one window, where MONAI
    # drops the shift) never gathers
    assert [g is not None for g in rw.layers1[0].gathers] == [True, True, True]
    assert rw.layers4[0].gathers == [None, None, None]
    x = torch.rand(3, 3, 64, 64)
    assert _max_diff(swin, rw, x) < 1e-5
    assert swin.layers1[0].__class__.__name__ == "BasicLayer"  # the trained module is left as it was


@pytest.mark.parametrize("mutant", ["no shift mask", "no shift", "scale not folded"])
def test_a_broken_rewrite_differs(swin, monkeypatch, mutant: str) -> None:
    """The equality above is sensitive: each piece of the rewrite, removed, changes the output."""
    if mutant == "no shift mask":
        monkeypatch.setattr(R, "shift_mask", lambda h, w, window, shift: np.zeros((h * w // (window[0] * window[1]),
                                                                                  window[0] * window[1],
                                                                                  window[0] * window[1]), np.float32))
    elif mutant == "no shift":
        real = R.window_order
        monkeypatch.setattr(R, "window_order", lambda h, w, window, shift: real(h, w, window, (0, 0)))
    else:
        monkeypatch.setattr(R, "_scaled_qkv", lambda attn: attn.qkv)
    rw = R.rewrite_for_export(swin, 64)
    assert _max_diff(swin, rw, torch.rand(2, 3, 64, 64)) > 1e-2


def test_window_order_is_monai_roll_and_partition() -> None:
    from monai.networks.nets.swin_unetr import window_partition

    h, w, win, shift = 8, 12, (4, 4), (2, 2)
    raster = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w, 1)
    want = window_partition(torch.roll(raster, (-shift[0], -shift[1]), (1, 2)), win).reshape(-1)
    assert np.array_equal(R.window_order(h, w, win, shift), want.numpy().astype(np.int64))


def test_no_stage_to_rewrite_is_refused() -> None:
    with pytest.raises(ValueError, match="no MONAI Swin stage"):
        R.rewrite_for_export(torch.nn.Linear(3, 3), 8)


def test_exported_graph_is_leaner_and_passes_parity(swin, tmp_path: Path) -> None:
    """The ONNX of the rewrite: parity with MONAI (the export's own check), no cyclic-shift slices or
    concats inside the stages, fewer transposes, and OpenVINO's CPU plugin fuses every attention."""
    import onnx

    from edge.build.export import ExportConfig, check_parity, export_form, torch_to_onnx

    class Pooled(torch.nn.Module):  # one output, as a task model has
        def __init__(self) -> None:
            super().__init__()
            self.encoder = swin

        def forward(self, x):
            return torch.cat([m.mean(dim=(-2, -1)) for m in self.encoder(x)], 1)

    model = Pooled().eval()
    counts = {}
    for rewrite in (False, True):
        path = tmp_path / f"rewrite-{rewrite}.onnx"
        torch_to_onnx(export_form(model, 64, ExportConfig(graph_rewrites=rewrite)), path, 64)
        assert check_parity(model, path, None, 64, ExportConfig(parity_batches=(1, 3))).passed
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        counts[rewrite] = {op: ops.count(op) for op in ("Transpose", "Concat", "Slice", "Softmax", "Gather")}
    plain, rw = counts[False], counts[True]
    assert rw["Softmax"] == plain["Softmax"] == 8
    assert rw["Transpose"] < plain["Transpose"] and rw["Concat"] < plain["Concat"], counts
    # q, k and v as three linears: every head split / merge is a 4-D transpose (one qkv linear
    # needs a 6-D one per block, MONAI's window partition 6-D ones too)
    assert _transpose_ranks(tmp_path / "rewrite-False.onnx") - {4}
    assert _transpose_ranks(tmp_path / "rewrite-True.onnx") == {4}
    _assert_openvino_fuses_attention(tmp_path / "rewrite-True.onnx")


def test_one_qkv_linear_needs_a_6d_transpose(swin, tmp_path: Path) -> None:
    """The form before the split (``split_qkv=False``) equals MONAI too but keeps a 6-D transpose per block:
    the check above would notice a rewrite that went back to it."""
    from edge.build.export import torch_to_onnx

    rw = R.rewrite_for_export(swin, 64, split_qkv=False)
    assert _max_diff(swin, rw, torch.rand(2, 3, 64, 64)) < 1e-5
    torch_to_onnx(rw, tmp_path / "one-qkv.onnx", 64)
    assert 6 in _transpose_ranks(tmp_path / "one-qkv.onnx")


def _transpose_ranks(path: Path) -> set[int]:
    import onnx

    return {len(next(a.ints for a in n.attribute if a.name == "perm"))
            for n in onnx.load(str(path)).graph.node if n.op_type == "Transpose"}


def _assert_openvino_fuses_attention(path: Path) -> None:
    import platform

    import openvino as ov

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip(f"OpenVINO's attention fusion (CPU snippets) is x86-64 only; this is {platform.machine()}")
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.inputs[0].get_any_name(): [1, 3, 64, 64]})
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    types = [op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ops()]
    assert "Softmax" not in types and "MatMul" not in types, sorted(set(types))
