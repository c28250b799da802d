"""Secure aggregation at the hospital: the site's update leaves only masked (Flower's SecAgg+).

With ``secure-aggregation = true`` in the run config the coordinator drives Flower's
``SecAggPlusWorkflow`` (server/coordinator/secagg.py). A training round is then four messages
instead of one: setup (the site sends two public keys), share keys (it sends encrypted shares of
its secrets to its neighbours, through the coordinator), collect masked vectors (it trains and
sends its update masked), unmask (it sends the shares the coordinator needs to remove the masks of
the *sum*). The coordinator learns the sum of the updates, never one site's update.

What the site does before its update is masked (:func:`masked_fit_reply`):

1. it trains exactly as in a plain round (``fed.task.train_secure_round``: DP-SGD within its policy
   and budget, charged to its ledger); the update is already differentially private. Its stored
   reply is keyed apart from a plain round's (``fed.task.TRAIN_SECURE``): the same request sent
   plain afterwards is a new, charged release, never this round's stored, unmasked update;
2. it takes the **update** (trained head minus the global head it received), refuses a
   non-finite one (raises: the site drops out of the round and SecAgg+ removes its masks), and
   clips its L2 norm to the coordinator's bound (:func:`bound_update`). Under secure aggregation
   the coordinator cannot look at one update to reject it (``SiteGuard``'s NaN, outlier and
   distance checks see only plain updates), so the bound is enforced here, before masking;
3. it hands the bounded update and a weight (1 when it trained, 0 when it refused or its budget is
   exhausted: a zero vector that adds nothing to the sum) to Flower's ``secaggplus_mod``, which
   quantizes each coordinate within ``[-bound, bound]`` and masks it. Sites count equally: the
   site's example count never leaves it.

Clipping a DP update is post-processing: it costs no privacy. The bound protects the aggregate
from a broken or overeager site, not from a malicious one: a site that skips this code can send
any masked integers (see docs/privacy.md, "Secure aggregation").

:func:`secure_aggregation_mod` is the ClientApp mod: SecAgg+ messages go to Flower's
``secaggplus_mod`` around :func:`masked_fit_reply`; every other message (plain training rounds,
evaluation) goes to the app's own handlers unchanged, except that a site whose policy requires
secure aggregation refuses plain training rounds (the coordinator cannot downgrade it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fed.features import site_device
from fed.policy import SitePolicy
from fed.task import STATUS_OK, Reply, RoundConfig, train_secure_round

log = logging.getLogger(__name__)

#: Keys the coordinator adds to the legacy fit config of a SecAgg+ round (besides RoundConfig's).
PARAM_NAMES = "secagg-param-names"  # JSON list: the names of the global head's arrays, in order
UPDATE_KEYS = "secagg-update-keys"  # JSON list: the trainable parameters whose update is summed, in order
UPDATE_BOUND = "secagg-update-bound"  # L2 bound of the site's update (and SecAgg+'s clipping range)

TrainFn = Callable[[SitePolicy, RoundConfig, dict[str, np.ndarray]], Reply]


class NonFiniteUpdate(ValueError):
    """The site's own update has a NaN or Inf: it is not sent (the site drops out of the round)."""


@dataclass
class BoundedUpdate:
    """A site's update, as masked: ``delta[k]`` = trained minus global, scaled by ``scale`` <= 1."""

    delta: dict[str, np.ndarray]
    norm: float  # L2 norm of the update before bounding
    scale: float  # min(1, bound / norm)


def bound_update(trained: dict[str, np.ndarray], global_: dict[str, np.ndarray], keys: list[str],
                 bound: float) -> BoundedUpdate:
    """The update ``trained - global_`` over ``keys``, its L2 norm clipped to ``bound``.

    Raises :class:`NonFiniteUpdate` if the update has a NaN or Inf, ``ValueError`` for a
    non-positive bound or a key missing on either side."""
    if not bound > 0:
        raise ValueError(f"secure aggregation: the update bound must be > 0, got {bound!r}")
    missing = [k for k in keys if k not in trained or k not in global_]
    if missing:
        raise ValueError(f"secure aggregation: the update has no parameter(s) {missing}")
    delta = {k: np.asarray(trained[k], np.float64) - np.asarray(global_[k], np.float64) for k in keys}
    if not all(np.all(np.isfinite(d)) for d in delta.values()):
        raise NonFiniteUpdate("secure aggregation: this site's update is not finite (NaN or Inf); it is not sent")
    norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in delta.values())))
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return BoundedUpdate({k: d * scale for k, d in delta.items()}, norm, scale)


def masked_fit_reply(msg: Message, policy: SitePolicy, train: TrainFn = train_secure_round) -> Message:
    """Answer the legacy fit instruction inside a SecAgg+ round (``secaggplus_mod`` masks the reply).

    The reply's parameters are the bounded update of the coordinator's ``UPDATE_KEYS`` (zeros of
    the same shapes, weight 0, when the site did not train); its plain metrics say which site
    answered, its status and the privacy figures the site discloses, as in a plain round."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    try:
        names = json.loads(str(config.pop(PARAM_NAMES)))
        keys = json.loads(str(config.pop(UPDATE_KEYS)))
        bound = float(config.pop(UPDATE_BOUND))
    except KeyError as e:
        raise ValueError(f"secure aggregation: the coordinator's instruction lacks {e.args[0]!r}") from None
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(arrays):
        raise ValueError(f"secure aggregation: {len(arrays)} global arrays but {len(names)} names")
    global_ = dict(zip(names, arrays))
    reply = train(policy, RoundConfig.from_record(config), global_)
    if reply.status == STATUS_OK:
        if reply.arrays is None or set(reply.arrays) != set(keys):
            raise ValueError(f"secure aggregation: the coordinator asks for the update of {sorted(keys)}, "
                             f"this site's head trains {sorted(reply.arrays or {})}")
        update = bound_update(reply.arrays, global_, keys, bound)
        if update.scale < 1.0:
            log.info("%s: update norm %.4g clipped to the bound %g before masking", policy.site_name, update.norm, bound)
        vectors, weight = [update.delta[k] for k in keys], 1
    else:
        vectors, weight = [np.zeros(np.shape(global_[k]), np.float64) for k in keys], 0
    metrics = {"site": reply.site, "status": reply.status, "reason": reply.reason, "accountant": "rdp",
               "device": site_device(policy.device).device_class,  # a capability, as in plain replies
               **({"privacy-unit": reply.unit} if reply.unit else {}), **{k: float(v) for k, v in reply.metrics.items()}}
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vectors), weight, metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def is_secagg_message(msg: Message) -> bool:
    """A training message of a SecAgg+ round (it carries the protocol's config record)."""
    return (msg.metadata.message_type == MessageType.TRAIN and msg.has_content()
            and RECORD_KEY_CONFIGS in msg.content.config_records)


def check_unmask_request(msg: Message) -> None:
    """Refuse an unmask request that names this very site as dropped out.

    A site answers the unmask stage only after it sent its masked update; a coordinator that calls
    it "dropped" asks for the share of its pairwise-mask key, which together with the shares of its
    private mask would unmask this site's own update. Flower's SecAgg+ (semi-honest variant) does
    not check this; the site does (it cannot see what the coordinator tells other sites)."""
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    if configs.get(Key.STAGE) == Stage.UNMASK and msg.metadata.dst_node_id in list(configs.get(Key.DEAD_NODE_ID_LIST, [])):
        raise ValueError("secure aggregation: the coordinator claims this site dropped out after it sent its "
                         "masked update; refusing to reveal its key shares")


def requires_secure_aggregation(policy: SitePolicy) -> bool:
    """The site's policy says ``require_secure_aggregation = true`` (the coordinator cannot switch it off)."""
    return bool(getattr(policy, "require_secure_aggregation", False))


def refuse_plain_training(msg: Message, policy: SitePolicy) -> Message:
    """A plain (unmasked) training request to a site whose policy requires secure aggregation:
    nothing is trained, nothing is charged, the reply says why."""
    from fed.client_app import to_content  # the ClientApp module imports this one
    from fed.task import STATUS_REFUSED

    log.warning("%s: refused a training round without secure aggregation (the site's policy requires it)",
                policy.site_name)
    return Message(to_content(Reply(STATUS_REFUSED, policy.site_name,
                                    reason="this site trains only under secure aggregation (its policy requires it)")),
                   reply_to=msg)


def secure_aggregation_mod(policy_of: Callable[[Context], SitePolicy], train: TrainFn = train_secure_round):
    """The ClientApp mod: SecAgg+ rounds through Flower's ``secaggplus_mod``, anything else unchanged.

    ``policy_of(context)``: the site's policy (fed.client_app.policy_from_context); ``train``: the
    site's SecAgg+ training round (``fed.task.train_secure_round``; tests wrap it to watch the update)."""

    def mod(msg: Message, context: Context, call_next) -> Message:
        if not is_secagg_message(msg):
            if msg.metadata.message_type == MessageType.TRAIN and requires_secure_aggregation(policy_of(context)):
                return refuse_plain_training(msg, policy_of(context))
            return call_next(msg, context)
        check_unmask_request(msg)
        return secaggplus_mod(msg, context, lambda m, c: masked_fit_reply(m, policy_of(c), train))

    return mod


__all__ = ["PARAM_NAMES", "UPDATE_KEYS", "UPDATE_BOUND", "BoundedUpdate", "NonFiniteUpdate", "bound_update",
           "masked_fit_reply", "is_secagg_message", "check_unmask_request", "requires_secure_aggregation",
           "refuse_plain_training", "secure_aggregation_mod"]
