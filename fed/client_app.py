"""The hospital's Flower ClientApp: unpack the message, call the site's plain functions, reply.

The site policy's path comes from the SuperNode's node config (``policy``). In a local
simulation each virtual hospital finds its policy at ``<sim-sites-dir>/site-<partition-id>/policy.toml``
(the run config names ``sim-sites-dir``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fed.policy import SitePolicy, load_policy
from fed.task import Reply, RoundConfig, evaluate_round, train_round

def policy_from_context(context: Context, sites_dir: str | None = None) -> SitePolicy:
    if "policy" in context.node_config:
        return load_policy(str(context.node_config["policy"]))
    sites_dir = sites_dir or context.run_config.get("sim-sites-dir")
    if sites_dir and "partition-id" in context.node_config:
        return load_policy(Path(str(sites_dir)) / f"site-{int(context.node_config['partition-id'])}" / "policy.toml")
    raise RuntimeError("no site policy: start the SuperNode with --node-config 'policy=\"/path/policy.toml\"'")


def to_content(reply: Reply) -> RecordDict:
    """Only numbers, head parameters and the site's pseudonym leave the site."""
    content = RecordDict({
        "site": ConfigRecord({"site": reply.site, "status": reply.status, "reason": reply.reason, "accountant": "rdp"}),
        # "dp-weight": equal weights for Flower's accounted central-DP FedAvg (it averages unweighted)
        "metrics": MetricRecord({"num-examples": int(reply.num_examples), "dp-weight": 1.0,
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
    return Message(to_content(train_round(policy, cfg, _arrays(msg))), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, sites_dir: str | None = None) -> Message:
    policy = policy_from_context(context, sites_dir)
    cfg = RoundConfig.from_record(msg.content["config"])
    return Message(to_content(evaluate_round(policy, cfg, _arrays(msg))), reply_to=msg)


def make_client_app(sites_dir: str | None = None) -> ClientApp:
    """The ClientApp. ``sites_dir``: where a local simulation laid out its virtual hospitals."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, sites_dir)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, sites_dir)

    return client


app = make_client_app()
