"""A calibration plan as message content and as an ``.npz`` file, for both plan kinds.

Both kinds (per-point histograms, one scale per group of points) share their checks and their
array round trip (edge/federated/plan.py); malformed content from the coordinator is one
:class:`PlanError` naming the part, never another exception. No model runs here (the model bytes
are opaque to the plan), so the file takes well under a second.
"""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest

from edge.federated.coordinator import (
    SiteAnswer,
    load_answers,
    load_plan,
    save_answers,
    save_plan,
)
from edge.federated.plan import CalibrationPlan, PlanError, ScalePlan, plan_from_arrays

POINTS = ("input", "conv1", "conv2")


def _histogram_plan() -> CalibrationPlan:
    return CalibrationPlan(b"model bytes", POINTS, np.tile(np.linspace(-2.0, 2.0, 9), (3, 1)), clip=0.5)


def _scale_plan() -> ScalePlan:
    groups = np.array([[-1, 0], [1, 0], [1, 2]])
    return ScalePlan(b"model bytes", POINTS, groups, np.where(groups >= 0, 0.25, np.nan), width=1.5, quantile=0.99, clip=0.5)


PLANS = {"histogram": _histogram_plan, "scale": _scale_plan}
# the plan kind's own numbers: (array name, how many, the error that names them)
NUMBERS = {"histogram": ("clip", 1, "the clipping bound must be one number"),
           "scale": ("numbers", 3, "a scale plan needs three numbers")}


@pytest.mark.parametrize("kind", PLANS)
def test_a_plan_comes_back_from_its_arrays_and_its_file(kind, tmp_path):
    plan = PLANS[kind]()
    arrays = plan.to_arrays()
    assert all(isinstance(a, np.ndarray) and a.dtype != object for a in arrays.values())  # no pickle anywhere
    assert json.loads(arrays["points"].tobytes().decode()) == list(POINTS)
    for back in (plan_from_arrays(arrays), load_plan(save_plan(plan, tmp_path / "plans" / f"{kind}.npz"))):
        assert type(back) is type(plan) and back.digest() == plan.digest()
        assert (back.model, back.points, back.clip, back.kind) == (b"model bytes", POINTS, 0.5, kind)
    assert stat.S_IMODE((tmp_path / "plans" / f"{kind}.npz").stat().st_mode) == 0o600


@pytest.mark.parametrize("kind", PLANS)
def test_malformed_plan_content_is_one_plan_error_naming_the_part(kind):
    arrays = PLANS[kind]().to_arrays()
    key, n, numbers_problem = NUMBERS[kind]
    text = lambda s: np.frombuffer(s.encode(), np.uint8)
    cases = {
        "not a calibration plan (KeyError: 'model')": {k: v for k, v in arrays.items() if k != "model"},
        "not a calibration plan (KeyError: 'points')": {k: v for k, v in arrays.items() if k != "points"},
        "not a calibration plan (JSONDecodeError": {**arrays, "points": text("[not json")},
        "not a calibration plan (UnicodeDecodeError": {**arrays, "points": np.array([0xFF, 0xFE], np.uint8)},
        "the quantization points must be a list of tensor names": {**arrays, "points": text('{"a": 1}')},
        numbers_problem: {**arrays, key: np.zeros(n + 1)},
        "the quantization points repeat a tensor name": {**arrays, "points": text('["a", "a", "b"]')},
        "the clipping bound must be in (0, 1e6]": {**arrays, key: np.array([1.0, 0.99, -1.0][-n:])},
        "the model must be 1 byte to": {**arrays, "model": np.zeros(0, np.uint8)},
    }
    for message, broken in cases.items():
        with pytest.raises(PlanError) as e:
            plan_from_arrays(broken)
        assert str(e.value).startswith(message), (message, str(e.value))


def test_site_answers_come_back_from_their_file(tmp_path):
    answers = [SiteAnswer("hospital-a", "ok", histograms=np.arange(6.0).reshape(2, 3), noise_std=1.5, epsilon=2.25,
                          delta=1e-5),
               SiteAnswer("hospital-b", "refused", reason="calibration = false"),
               SiteAnswer("hospital-c", "ok", histograms=np.ones((2, 3)), noise_std=1.5, not_private=True)]
    back = load_answers(save_answers(answers, tmp_path / "answers.npz"))
    assert [a.to_dict() for a in back] == [a.to_dict() for a in answers]
    assert np.array_equal(back[0].histograms, answers[0].histograms) and back[1].histograms is None
    assert np.array_equal(back[2].histograms, answers[2].histograms)
    assert stat.S_IMODE((tmp_path / "answers.npz").stat().st_mode) == 0o600
