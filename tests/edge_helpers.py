"""Shared helpers for the tests/test_edge_*.py files (not collected: no ``test_`` prefix).

Models are ``echocare-tiny`` task models. The classifier's linear head is *fitted* on pooled
features of real BUSI images (scikit-learn logistic regression), so accuracy figures and the
INT8 gate mean something; segmentation heads are freshly initialised (the tests that use them
check plumbing and fidelity, not accuracy). Built artifacts are cached per pytest process so the
test files share one export/quantization where they can.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LABELS = ["benign", "malignant", "normal"]
_CACHE: dict[str, object] = {}


def busi_spec(root: Path, limit: int, seed: int) -> str:
    return f"busi:{root}?limit={limit}&seed={seed}"


def trained_classifier(root_dir: Path, busi_root: Path) -> Path:
    """A tiny classify task model whose linear head is fitted on 96 BUSI images (cached per process).

    96, not 48: with EchoCare's own [0, 1] input (preprocessing spec v2) the random-init tiny encoder's
    features fitted on 48 images reach only AUROC 0.61 on the 60 evaluation images; 96 give 0.70."""
    key = f"classifier:{busi_root}"
    if key in _CACHE and Path(_CACHE[key], "model.json").is_file():
        return _CACHE[key]
    import torch
    from sklearn.linear_model import LogisticRegression

    from echocare.data import open_data
    from echocare.models.encoder import encode, load_encoder, pooled_features
    from echocare.models.heads import build_head, head_kwargs_of
    from echocare.models.task_model import TaskModelSpec, save_task_model
    from echocare.preprocess import preprocess_image

    site = open_data(busi_spec(busi_root, 96, 7))
    xs, ys = [], []
    for s, im in site.iter_images():
        xs.append(preprocess_image(im)[0])
        ys.append(LABELS.index(s.label))
    encoder, _ = load_encoder("echocare-tiny", None, seed=0)
    with torch.no_grad():
        f = pooled_features(encode(encoder, torch.from_numpy(np.stack(xs)))).numpy().astype(np.float64)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    clf = LogisticRegression(C=0.05, max_iter=2000).fit((f - mu) / sd, ys)
    head = build_head("classify", "echocare-tiny", len(LABELS))
    linear = head.net[-1]
    linear.weight.data = torch.tensor(clf.coef_ / sd, dtype=torch.float32)
    linear.bias.data = torch.tensor(clf.intercept_ - (clf.coef_ * mu / sd).sum(1), dtype=torch.float32)
    out = Path(root_dir) / "classifier"
    spec = TaskModelSpec("echocare-tiny", None, None, 0, "classify", LABELS, head_kwargs_of(head),
                         provenance={"note": "test model: linear head fitted on 96 BUSI images"})
    save_task_model(out, spec, head.state_dict())
    _CACHE[key] = out
    return out


def fresh_model(out: Path, task: str) -> Path:
    """A tiny task model with a freshly initialised head (seeded)."""
    import torch

    from echocare.models.heads import build_head, head_kwargs_of
    from echocare.models.task_model import TaskModelSpec, save_task_model

    labels = LABELS if task == "classify" else ["background", "lesion" if task == "segment" else "head"]
    torch.manual_seed(0)
    head = build_head(task, "echocare-tiny", len(labels))
    save_task_model(out, TaskModelSpec("echocare-tiny", None, None, 0, task, labels, head_kwargs_of(head)), head.state_dict())
    return out


def fake_run_dir(run: Path, model_dir: Path) -> Path:
    """A federation run directory layout around a task model: RUN/global + RUN/report.json."""
    import json
    import shutil

    shutil.copytree(model_dir, run / "global", dirs_exist_ok=True)
    report = {
        "dp": {"target_epsilon": 8.0, "delta": 1e-5},
        "data": {"hospital-a": "busi:/secret/site/path"},  # must not leak into a manifest
        "rounds": [
            {"round": r, "excluded": ["site-c"] if r == 2 else [],
             "sites": {s: {"status": "ok", "train": {}, "evaluate": {"auroc": 0.6 + 0.05 * r},
                           "privacy": {"epsilon": e * r, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1, "steps": 10 * r}}
                       for s, e in (("site-a", 1.5), ("site-b", 2.0))},
             "aggregated": {"train": {}, "evaluate": {"auroc": 0.62 + 0.05 * r}}}
            for r in (1, 2)
        ],
    }
    (run / "report.json").write_text(json.dumps(report))
    return run


# ------------------------------------------------------------------------ torch-free processes
BLOCKER = textwrap.dedent(
    '''
    """Loaded by site.py (PYTHONPATH): makes every import of torch fail in this process."""
    import sys

    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked in this process (the edge runtime must not need it): {name}")
            return None

    sys.meta_path.insert(0, _NoTorch())
    '''
)


def torch_free_env(tmp: Path) -> dict[str, str]:
    """Environment for a subprocess in which ``import torch`` raises ImportError."""
    d = Path(tmp) / "no-torch"
    d.mkdir(parents=True, exist_ok=True)
    (d / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(d), str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_py(args: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repo root; capture text output."""
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
