"""Registry gating (issue 10, item 4): a release goes to ``stable`` only with a passing signed
acceptance record; ``--force --reason`` overrides it; every promotion, override and refusal is in
an append-only, fsync'd audit log that ``registry audit`` prints. Real gRPC on loopback."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import grpc
import pytest
import typer
from typer.testing import CliRunner

from echocare.bundle import generate_keypair
from server.registry.audit import AuditLog, read_audit
from server.registry.client import ConnectionConfig, RegistryClient, RegistryError
from server.registry.sample_bundle import make_classifier_bundle
from server.registry.service import RegistryConfig, RegistryServer

pytestmark = pytest.mark.timeout(60)
ADMIN = "admin-" + secrets.token_hex(16)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    private, public = generate_keypair(tmp_path_factory.mktemp("keys") / "release")
    return {"private": private, "public": public}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, keys):
    d = tmp_path_factory.mktemp("gating")
    make = lambda v, **kw: make_classifier_bundle(d / v, keys["private"], v, **kw)  # noqa: E731
    return {"accepted": make("1.0.0", seed=1),  # measured record: agrees with its reference everywhere
            "no-record": make("1.1.0", seed=2, acceptance=False),
            "failed": make("1.2.0", seed=3, broken=True)}  # measured record: disagrees, refused by the build


@pytest.fixture
def server(tmp_path, keys):
    cfg = RegistryConfig(db=tmp_path / "reg" / "registry.db", blobs=tmp_path / "reg" / "blobs",
                         trusted_keys=[keys["public"]], admin_token=ADMIN)
    with RegistryServer(cfg) as srv:
        yield srv


@pytest.fixture
def admin(server):
    with RegistryClient(ConnectionConfig(server.address, ADMIN, insecure=True, timeout_s=10)) as c:
        yield c


def _error(fn) -> RegistryError:
    with pytest.raises(RegistryError) as e:
        fn()
    return e.value


def _stable(admin) -> list[str]:
    return [r.version for r in admin.list_releases("cart", "stable")]


def test_promote_needs_a_passing_acceptance_record_or_an_audited_override(server, admin, bundles):
    for b in bundles.values():
        admin.publish(b)
    # no record at all: refused, and the refusal names why
    e = _error(lambda: admin.promote("cart", "1.1.0"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "no acceptance record" in e.details, e.details
    # a record the build itself refused: the site and the metric are named
    e = _error(lambda: admin.promote("cart", "1.2.0"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "sample-generator" in e.details and "top1_agreement" in e.details, e.details
    # --force without a reason is no override
    e = _error(lambda: admin.promote("cart", "1.1.0", force=True, reason="   "))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "--reason" in e.details
    assert _stable(admin) == []
    # a passing record promotes; an override with a reason promotes and is recorded as forced
    release, event = admin.promote_audited("cart", "1.0.0")
    assert event.event == "promote" and "passed" in event.acceptance and _stable(admin) == ["1.0.0"]
    release, event = admin.promote_audited("cart", "1.1.0", force=True, reason="hotfix approved: ticket 4711")
    assert (event.event, event.reason, release.version) == ("promote-forced", "hotfix approved: ticket 4711", "1.1.0")
    assert _stable(admin)[0] == "1.1.0"

    events, unreadable = admin.audit()
    assert unreadable == []
    assert [(e.event, e.version) for e in events] == [
        ("promote-refused", "1.1.0"), ("promote-refused", "1.2.0"), ("promote", "1.0.0"), ("promote-forced", "1.1.0")]
    forced = events[-1]
    assert forced.sha256 == release.sha256 and forced.actor.startswith("admin@") and "no acceptance record" in forced.acceptance
    # the log on disk is one JSON object per line, in the same order
    lines = server.store.audit.path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == [e.event for e in events]
    # a device token can neither read the log nor promote
    _, token = admin.enroll_device("cart-1", "cart")
    with RegistryClient(ConnectionConfig(server.address, token, insecure=True, timeout_s=10)) as device:
        assert _error(device.audit).code == grpc.StatusCode.PERMISSION_DENIED


def test_publish_straight_to_stable_is_gated_and_stores_nothing_when_refused(server, admin, bundles):
    e = _error(lambda: admin.publish(bundles["no-record"], channel="stable"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "no acceptance record" in e.details
    assert server.store.list_classes() == [] or admin.list_releases("cart", "canary") == []
    assert not any(p.is_file() for p in (server.store.blob_dir / "sha256").rglob("*"))  # no blob kept
    admin.publish(bundles["accepted"], channel="stable")
    assert _stable(admin) == ["1.0.0"]
    events, _ = admin.audit("cart")
    assert [(e.event, e.version) for e in events] == [("promote-refused", "1.1.0"), ("promote", "1.0.0")]


def test_an_unwritable_audit_log_stops_the_promotion(server, admin, bundles):
    admin.publish(bundles["no-record"])
    server.store.audit.path.mkdir(parents=True)  # the log's path is now a folder: every append fails
    e = _error(lambda: admin.promote("cart", "1.1.0", force=True, reason="urgent"))
    assert e.code == grpc.StatusCode.UNAVAILABLE and "audit log" in e.details and "nothing was promoted" in e.details
    assert _stable(admin) == []


def test_audit_log_is_append_only_and_survives_a_torn_line(tmp_path, monkeypatch):
    import server.registry.audit as audit_module

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(audit_module.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    log = AuditLog(tmp_path / "audit.jsonl")
    log.append("promote", "cart", "1.0.0", sha256="a" * 64, acceptance="passed")
    assert synced, "an audit event must be fsync'd before the action it records"
    n = len(synced)
    first = log.path.read_bytes()
    with open(log.path, "ab") as f:  # a crash in the middle of an append
        f.write(b'{"at": 1.0, "event": "promo')
    log.append("promote-forced", "cart", "1.1.0", reason="why", acceptance="no record")
    assert len(synced) == n + 1  # the file itself (its folder is fsync'd only when the file is created)
    data = log.path.read_bytes()
    assert data.startswith(first)  # nothing before is ever rewritten
    found = read_audit(log.path)
    assert [e.version for e in found.events] == ["1.0.0", "1.1.0"] and found.unreadable_lines == [2]
    assert read_audit(tmp_path / "absent.jsonl").events == []
    with pytest.raises(ValueError, match="audit event"):
        log.append("delete-everything", "cart", "1")


def test_registry_cli_promote_force_reason_and_audit(server, admin, bundles, monkeypatch):
    from echofleet.cli import registry as registry_cli
    from echofleet.cli.registry import registry_app

    monkeypatch.setattr(registry_cli.console, "width", 250)  # one table row per event
    app = typer.Typer()
    app.add_typer(registry_app, name="registry")
    runner = CliRunner()
    monkeypatch.setenv("ECHOFLEET_REGISTRY_ADMIN_TOKEN", ADMIN)
    conn = ["--registry", server.address, "--insecure"]
    admin.publish(bundles["no-record"])

    r = runner.invoke(app, ["registry", "promote", "-c", "cart", "-v", "1.1.0", *conn])
    assert r.exit_code == 1 and "FAILED_PRECONDITION" in r.output and "--force --reason" in r.output, r.output
    r = runner.invoke(app, ["registry", "promote", "-c", "cart", "-v", "1.1.0", "--force", *conn])
    assert r.exit_code == 2 and "--force needs --reason" in r.output, r.output
    r = runner.invoke(app, ["registry", "promote", "-c", "cart", "-v", "1.1.0", "--reason", "x", *conn])
    assert r.exit_code == 2 and "--reason goes with --force" in r.output, r.output
    r = runner.invoke(app, ["registry", "promote", "-c", "cart", "-v", "1.1.0", "--force", "--reason",
                            "[bold]field fix[/] ticket 9", *conn])
    assert r.exit_code == 0 and "FORCED" in r.output, r.output
    r = runner.invoke(app, ["registry", "list", "-c", "cart", *conn])
    assert r.exit_code == 0 and "the signed manifest has no acceptance record" in r.output, r.output
    r = runner.invoke(app, ["registry", "audit", *conn])
    assert r.exit_code == 0 and "promote-refused" in r.output and "promote-forced" in r.output, r.output
    assert "[bold]field fix[/] ticket 9" in r.output  # the reason is text, not markup
    r = runner.invoke(app, ["registry", "audit", "--json", *conn])
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [x["event"] for x in rows] == ["promote-refused", "promote-forced"] and rows[1]["reason"].endswith("ticket 9")
    # a torn line in the log is reported, not hidden
    with open(server.store.audit.path, "ab") as f:
        f.write(b"{torn")
    r = runner.invoke(app, ["registry", "audit", *conn])
    assert r.exit_code == 1 and "line(s) 3 could not be read" in r.output, r.output
    assert os.path.getsize(server.store.audit.path) > 0
