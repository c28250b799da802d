"""The hospital's Flower ClientApp: unpack the message, call the site's plain functions, reply.

The site policy's path comes from the SuperNode's node config (``policy``). In a local
simulation each virtual hospital finds its policy at ``<sim-sites-dir>/site-<partition-id>/policy.toml``
(the run config names ``sim-sites-dir``; ``echofleet simulate`` lays them out). A simulated
SuperNode with neither (``flwr run .`` on Flower's local simulation) gets a phantom default
policy: echofleet's synthetic images, never patient data, and the log says so.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed.config import PHANTOM_DATA, RunConfig
from fed.features import site_device
from fed.secagg import secure_aggregation_mod
from fed.policy import SitePolicy, load_policy
from fed.task import Reply, RoundConfig, evaluate_round, train_round

log = logging.getLogger(__name__)


def policy_from_context(context: Context, sites_dir: str | None = None) -> SitePolicy:
    """The site's policy: the node config's ``policy`` file; in a simulation, the laid-out one or
    the phantom default (see the module docstring)."""
    if "policy" in context.node_config:  # load_policy refuses an explicit cuda device this machine cannot use
        return load_policy(str(context.node_config["policy"]))
    if "partition-id" not in context.node_config:
        raise RuntimeError("no site policy: start the SuperNode with --node-config 'policy=\"/path/policy.toml\"'")
    partition_id = int(context.node_config["partition-id"])
    sites_dir = sites_dir or context.run_config.get("sim-sites-dir")
    if sites_dir:
        return load_policy(Path(str(sites_dir)) / f"site-{partition_id}" / "policy.toml")
    return phantom_default_policy(partition_id, int(context.node_config.get("num-partitions", 1)),
                                  RunConfig.from_run_config(context.run_config))


@lru_cache(maxsize=64)  # one warning per virtual site and run, not one per message
def phantom_default_policy(partition_id: int, num_partitions: int, run: RunConfig) -> SitePolicy:
    """Simulation only: a virtual hospital without a policy holds one share of echofleet's phantoms.

    Its budget is the run's target epsilon, its state (feature cache, privacy ledger) lives under
    ``<run-dir>/phantom-sites/``, and its pseudonym says ``phantom`` in every report."""
    name = f"phantom-site-{partition_id}"
    log.warning("%s: simulation default: phantom data, not patients (%s; no policy in the node config)",
                name, PHANTOM_DATA)
    return SitePolicy(data=PHANTOM_DATA, site_name=name,
                      state_dir=str(Path(run.run_dir).resolve() / "phantom-sites" / name / "state"),
                      allowed_tasks=(run.task,), target_epsilon=run.target_epsilon,
                      max_local_epochs=max(5, run.local_epochs), partition="iid", partition_index=partition_id,
                      partition_count=num_partitions, partition_seed=run.seed)


def to_content(reply: Reply, device: str | None = None) -> RecordDict:
    """What leaves the site (docs/privacy.md): the pseudonym, a status, DP head parameters, DP or
    policy-disclosed metrics, lifetime epsilon/delta, and the class of its compute device
    (``device``, e.g. ``"cuda:H200"`` or ``"cpu"``: a capability of the machine, independent of the
    data). ``num-examples`` is the fixed weight 1 (0 for a reply without an update), never the
    site's count: FedAvg averages the sites equally."""
    site = {"site": reply.site, "status": reply.status, "reason": reply.reason, "accountant": "rdp",
            **({"privacy-unit": reply.unit} if reply.unit else {})}  # "patient" | "image": a word, no count
    content = RecordDict({
        "site": ConfigRecord({**site, **({"device": device} if device else {})}),
        # "dp-weight": equal weights for Flower's accounted central-DP FedAvg (it averages unweighted)
        "metrics": MetricRecord({"num-examples": int(reply.weight), "dp-weight": 1.0,
                                 **{k: float(v) for k, v in reply.metrics.items()}}),
    })
    if reply.arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in reply.arrays.items()})
    return content


def _arrays(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content["arrays"].items()}


def handle_train(msg: Message, context: Context, sites_dir: str | None = None) -> Message:
    policy = policy_from_context(context, sites_dir)
    cfg = RoundConfig.from_record(msg.content["config"])
    reply = train_round(policy, cfg, _arrays(msg))
    return Message(to_content(reply, site_device(policy.device).device_class), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, sites_dir: str | None = None) -> Message:
    policy = policy_from_context(context, sites_dir)
    cfg = RoundConfig.from_record(msg.content["config"])
    reply = evaluate_round(policy, cfg, _arrays(msg))
    return Message(to_content(reply, site_device(policy.device).device_class), reply_to=msg)


def make_client_app(sites_dir: str | None = None) -> ClientApp:
    """The ClientApp. ``sites_dir``: where a local simulation laid out its virtual hospitals."""
    # SecAgg+ rounds (run config secure-aggregation) go through Flower's secaggplus_mod; plain and
    # evaluation messages pass through unchanged, so one ClientApp serves both kinds of run.
    client = ClientApp(mods=[secure_aggregation_mod(lambda ctx: policy_from_context(ctx, sites_dir))])

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, sites_dir)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, sites_dir)

    return client


app = make_client_app()
