"""A new user's bad command lines: every one gets exit code 2 and a short answer (under 5 lines) that
names the problem, before any work starts (nothing is written, no network call is made).

Typer/Click's own usage errors (a malformed number, a missing option) are in the table too: the
top-level app prints them in Click's 4 plain lines, not in a panel that wraps long messages."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echofleet.cli import app

TOKEN = "an-admin-token-of-32-characters!"

# (id, argv with {placeholders}, substring the answer must contain, environment)
# {tmp}: an empty folder per case; {file}: a regular file; {notphantom}: a folder with a stranger's file.
# Registry cases run with ECHOFLEET_REGISTRY unset and a valid admin token in the environment unless
# the case sets them; a registry address is never dialled (the checks come first).
CASES = [
    # echofleet site check
    ("site check missing data", "site check busi:/definitely/not/here", "path not found", {}),
    ("site check bad val fraction", "site check phantom:12 --val-fraction 2", "--val-fraction 2", {}),
    ("site check json is a folder", "site check phantom:12 --json {tmp}", "is a folder", {}),
    ("site check json under a file", "site check phantom:12 --json {file}/r.json", "exists and is not a folder", {}),
    ("site check bad show-problems", "site check phantom:12 --show-problems -1", "'--show-problems'", {}),
    # echofleet phantom
    ("phantom bad profile", "phantom {tmp}/p --profile sector-x", "unknown phantom profile(s) sector-x", {}),
    ("phantom n below 1", "phantom {tmp}/p --n 0", "--n 0: must be at least 1", {}),
    ("phantom n not a number", "phantom {tmp}/p --n many", "'many' is not a valid integer", {}),
    ("phantom out under a file", "phantom {file}/p", "is a file, not a folder", {}),
    ("phantom out is a file", "phantom {file}", "exists and is not a folder", {}),
    ("phantom out is someone's folder", "phantom {notphantom}", "not a phantom set", {}),
    # echofleet registry ...
    ("registry no address", "registry list -c cart", "Missing option '--registry'", {}),
    ("registry address without port", "registry list -c cart -r registry.example", "expected HOST:PORT", {}),
    ("registry address with scheme", "registry promote -c cart -v 1.0.0 -r https://registry.example:50071",
     "is not a DNS name or an IPv4 address", {}),
    ("registry address bad port", "registry devices list -r registry.example:0", "port '0'", {}),
    ("registry address from env", "registry devices remove d1", "ECHOFLEET_REGISTRY", {"ECHOFLEET_REGISTRY": "nonsense"}),
    ("registry no admin token", "registry promote -c cart -v 1.0.0 -r localhost:50071", "no admin token",
     {"ECHOFLEET_REGISTRY_ADMIN_TOKEN": ""}),
    ("registry missing CA file", "registry list -c cart -r localhost:50071 --ca {tmp}/ca.crt", "ca.crt: no such file", {}),
    ("registry publish missing bundle", "registry publish {tmp}/b.tar.gz -r localhost:50071 --insecure", "does not exist", {}),
    ("registry publish bad channel", "registry publish {file} -r localhost:50071 --channel beta --insecure", "--channel 'beta'", {}),
    ("registry token file exists", "registry devices add cart-1 -c cart -r localhost:50071 --insecure --token-file {file}",
     "already exists", {}),
    ("registry serve without TLS", "registry serve --trusted-key {file}", "--tls-cert", {}),
    ("registry serve bad port", "registry serve --trusted-key {file} --insecure --port 70000", "--port 70000", {}),
    ("registry serve missing key", "registry serve --trusted-key {tmp}/release.pub --insecure", "release.pub: no such file", {}),
    # echofleet certs ...
    ("certs server missing CA folder", "certs server --ca {tmp}/ca --san localhost --out {tmp}/tls", "ca.key: not found", {}),
    ("certs server bad san", "certs server --ca {tmp}/ca --san 'not a name' --out {tmp}/tls", "not a DNS name or an IP address", {}),
    ("certs init zero days", "certs init --out {tmp}/ca --days 0", "'--days'", {}),
    ("certs server days not a number", "certs server --ca {tmp}/ca --san localhost --out {tmp}/tls --days soon",
     "'soon'", {}),
    ("certs init out under a file", "certs init --out {file}/ca", "is a file, not a folder", {}),
    ("certs node out is a folder", "certs node --out {tmp}", "is a folder", {}),
    # owned by the simulate/edge work (--out and small sizes keep a regression cheap and out of the repo)
    ("simulate missing data", "simulate --data busi:/nonexistent --out {tmp}/sim --rounds 1 --sites 2", "/nonexistent", {}),
    ("simulate bad dirichlet", "simulate --partition dirichlet:abc --out {tmp}/sim --rounds 1 --sites 2", "dirichlet", {}),
    ("simulate unknown task", "simulate --task nope --out {tmp}/sim --rounds 1 --sites 2", "nope", {}),
    ("edge build missing run", "edge build /nonexistent --target openvino-cpu --val phantom:4 --key {tmp}/k --out {tmp}/o",
     "/nonexistent", {}),
    # the top level
    ("unknown command", "federate", "No such command 'federate'", {}),
]


@pytest.fixture(scope="module")
def fixed(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli-errors")
    (d / "file").write_text("a regular file\n")
    (d / "notphantom").mkdir()
    (d / "notphantom" / "thesis.docx").write_text("not images")
    return {"file": d / "file", "notphantom": d / "notphantom"}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("argv, expected, env", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_bad_arguments_get_one_short_answer_and_exit_2(argv, expected, env, fixed, tmp_path):
    args = [a.format(tmp=tmp_path, **fixed) for a in shlex.split(argv)]
    env = {"ECHOFLEET_REGISTRY": None, "ECHOFLEET_REGISTRY_ADMIN_TOKEN": TOKEN, "COLUMNS": "100", **env}
    before = _tree(tmp_path), _tree(fixed["notphantom"])
    result = CliRunner().invoke(app, args, env=env)
    out = result.output
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert len(out.strip().splitlines()) < 5, out
    assert expected in out, out
    assert "Traceback" not in out
    assert (_tree(tmp_path), _tree(fixed["notphantom"])) == before, "a refused command wrote files"
