"""Registry under a fleet: N simulated scanners polling and downloading concurrently (loopback).

The registry runs as its own process (``registry serve``, as deployed); the devices are asyncio
gRPC clients in this process, one channel (TCP connection) each. Every device loops:

    ListReleases(canary) -> if the current release is new: Download (stream) + sha256 check
    -> ReportStatus -> sleep ``--interval`` (±10 % jitter)

A release is published before the devices start and a second one a third of the way through, so
the run contains two "everyone downloads at once" waves besides steady polling. Printed side by
side, from the same run and machine:

- one device alone (baseline) vs N devices: requests per second held (vs offered), p50/p99
  latency of the poll/report calls and of whole downloads, and the p99 ratio N-vs-1;
- installs and corrupted installs (a download whose sha256 or size differs from what the
  registry announced). The script exits 1 if any install is corrupted, if any RPC failed, or if
  a device did not reach the last release.

Usage: ``.venv/bin/python bench/bench_registry.py [--devices 200] [--duration 20]``
(bounded: the whole run stops after about ``duration + 30`` seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from echocare.bundle import generate_keypair  # noqa: E402
from server.registry.client import ConnectionConfig, RegistryClient, RegistryError  # noqa: E402
from server.registry.proto import registry_pb2 as pb  # noqa: E402
from server.registry.proto import registry_pb2_grpc as pb_grpc  # noqa: E402
from server.registry.sample_bundle import make_classifier_bundle  # noqa: E402

console = Console()


@dataclass
class Stats:
    unary: list[float] = field(default_factory=list)  # ListReleases + ReportStatus latencies (s)
    downloads: list[float] = field(default_factory=list)  # whole download streams (s)
    requests: int = 0
    installs: int = 0
    corrupted: int = 0
    errors: Counter = field(default_factory=Counter)
    installed: dict[int, str] = field(default_factory=dict)  # device -> sha256


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _device(i: int, address: str, token: str, interval: float, stop_at: float, stats: Stats, rng: random.Random):
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 8 << 20)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = pb_grpc.RegistryStub(channel)
        md = (("authorization", f"Bearer {token}"),)
        installed, version = "", ""
        await asyncio.sleep(rng.uniform(0, interval))  # devices do not boot in lockstep
        while time.monotonic() < stop_at:
            try:
                t0 = time.perf_counter()
                reply = await stub.ListReleases(
                    pb.ListReleasesRequest(device_class="cart", channel=pb.CANARY), metadata=md, timeout=30
                )
                stats.unary.append(time.perf_counter() - t0)
                stats.requests += 1
                release = reply.releases[0] if reply.releases else None
                if release is not None and release.sha256 != installed:
                    t0 = time.perf_counter()
                    h, size = hashlib.sha256(), 0
                    async for chunk in stub.Download(
                        pb.DownloadRequest(device_class="cart", version=release.version), metadata=md, timeout=120
                    ):
                        h.update(chunk.data)
                        size += len(chunk.data)
                    stats.downloads.append(time.perf_counter() - t0)
                    stats.requests += 1
                    if h.hexdigest() == release.sha256 and size == release.size:
                        installed, version = release.sha256, release.version
                        stats.installs += 1
                        stats.installed[i] = installed
                    else:
                        stats.corrupted += 1
                t0 = time.perf_counter()
                await stub.ReportStatus(
                    pb.StatusReport(running_version=version, health=pb.HEALTHY, channel=pb.CANARY), metadata=md, timeout=30
                )
                stats.unary.append(time.perf_counter() - t0)
                stats.requests += 1
            except grpc.aio.AioRpcError as e:
                stats.errors[e.code().name] += 1
            await asyncio.sleep(interval * rng.uniform(0.9, 1.1))


async def _fleet(address: str, tokens: list[str], interval: float, duration: float,
                 publish_midway=None) -> tuple[Stats, float]:
    stats, rng = Stats(), random.Random(0)
    start = time.monotonic()
    stop_at = start + duration
    tasks = [asyncio.create_task(_device(i, address, t, interval, stop_at, stats, rng)) for i, t in enumerate(tokens)]
    if publish_midway is not None:
        await asyncio.sleep(duration / 3)
        await asyncio.to_thread(publish_midway)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=duration + 30)
    return stats, time.monotonic() - start


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200, help="simulated scanners (default 200)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of fleet traffic (default 20)")
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between a device's polls (default 1)")
    ap.add_argument("--bundle-kib", type=int, default=256, help="payload added to each bundle (default 256 KiB)")
    ap.add_argument("--baseline", type=float, default=4.0, help="seconds of the one-device baseline (default 4)")
    ap.add_argument("--workers", type=int, default=64, help="registry thread pool (default 64)")
    args = ap.parse_args()

    admin_token = secrets.token_hex(24)
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        tmp = Path(tmp)
        private, public = generate_keypair(tmp / "release")
        bundles = [make_classifier_bundle(tmp / v, private, v, payload_bytes=args.bundle_kib * 1024, seed=k)
                   for k, v in enumerate(("1.0.0", "1.1.0", "1.2.0"))]
        bundle_kib = bundles[0].stat().st_size // 1024
        port = _free_port()
        cmd = [sys.executable, "-c", "from echofleet.cli.registry import registry_app; registry_app()", "serve", "--insecure",
               "--port", str(port), "--db", str(tmp / "reg.db"), "--blobs", str(tmp / "blobs"),
               "--trusted-key", str(public), "--workers", str(args.workers)]
        log = open(tmp / "serve.log", "w")
        server = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "ECHOFLEET_REGISTRY_ADMIN_TOKEN": admin_token},
                                  stdout=log, stderr=subprocess.STDOUT)
        address = f"127.0.0.1:{port}"
        try:
            admin = RegistryClient(ConnectionConfig(address, admin_token, insecure=True, timeout_s=30))
            deadline = time.monotonic() + 30
            while True:
                try:
                    admin.publish(bundles[0])
                    break
                except RegistryError as e:
                    if e.code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline or server.poll() is not None:
                        raise
                    time.sleep(0.2)
            tokens = [admin.enroll_device(f"scanner-{i:04d}", "cart")[1] for i in range(args.devices + 1)]

            console.print(f"baseline: 1 device for {args.baseline:g} s ...")
            base, base_t = asyncio.run(_fleet(address, tokens[-1:], args.interval, args.baseline))
            admin.publish(bundles[1])  # the fleet starts with a new release to fetch
            console.print(f"fleet: {args.devices} devices for {args.duration:g} s (a new release at {args.duration / 3:.0f} s) ...")
            fleet, fleet_t = asyncio.run(
                _fleet(address, tokens[:-1], args.interval, args.duration, lambda: admin.publish(bundles[2]))
            )
            final = admin.current_release("cart", "canary").sha256
            reported = [d for d in admin.list_devices("cart") if d.running_version == "1.2.0"]
            admin.close()
        finally:
            server.terminate()
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()

    offered = lambda n: n * 2 / args.interval  # noqa: E731  (list + report per poll)
    table = Table(title=f"registry under load ({os.cpu_count()} CPUs, loopback, bundle {bundle_kib} KiB)")
    for col in ("", "1 device", f"{args.devices} devices", "ratio"):
        table.add_column(col, justify="right")
    b_rps, f_rps = base.requests / base_t, fleet.requests / fleet_t
    table.add_row("requests/s offered (polls)", f"{offered(1):.0f}", f"{offered(args.devices):.0f}", "")
    table.add_row("requests/s held", f"{b_rps:.1f}", f"{f_rps:.1f}", f"{f_rps / b_rps:.1f}x")
    for name, q in (("poll/report p50 ms", 50), ("poll/report p99 ms", 99)):
        b, f = _pct(base.unary, q), _pct(fleet.unary, q)
        table.add_row(name, f"{b:.2f}", f"{f:.2f}", f"{f / b:.1f}x")
    b, f = _pct(base.downloads, 99), _pct(fleet.downloads, 99)
    table.add_row("download p99 ms", f"{b:.1f}", f"{f:.1f}", f"{f / b:.1f}x" if base.downloads else "")
    table.add_row("installs (sha256 verified)", str(base.installs), str(fleet.installs), "")
    table.add_row("corrupted installs", str(base.corrupted), str(fleet.corrupted), "")
    table.add_row("failed RPCs", str(sum(base.errors.values())), str(sum(fleet.errors.values())), "")
    on_latest = sum(1 for sha in fleet.installed.values() if sha == final)
    table.add_row("devices on the last release", "", f"{on_latest}/{args.devices} (reported: {len(reported)})", "")
    console.print(table)
    problems = []
    if base.corrupted or fleet.corrupted:
        problems.append("corrupted installs")
    if base.errors or fleet.errors:
        problems.append(f"failed RPCs {dict(base.errors + fleet.errors)}")
    if on_latest != args.devices:
        problems.append(f"only {on_latest}/{args.devices} devices reached the last release")
    if problems:
        console.print("[bold red]FAIL:[/] " + "; ".join(problems))
        return 1
    console.print("[green]OK:[/] every device installed every release, none corrupted, no failed RPCs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
