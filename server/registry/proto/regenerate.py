"""Regenerate the committed gRPC/protobuf modules from ``registry.proto``.

Run from anywhere (grpcio-tools is in the ``dev`` extra)::

    .venv/bin/python -m server.registry.proto.regenerate            # rewrite the committed modules
    .venv/bin/python -m server.registry.proto.regenerate --out DIR  # write them under DIR instead

The modules import each other as ``server.registry.proto.registry_pb2`` because protoc is run with
the repository root as include path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PROTO = Path("server/registry/proto/registry.proto")
GENERATED = ("registry_pb2.py", "registry_pb2.pyi", "registry_pb2_grpc.py")


def generate(out_root: Path = REPO) -> list[Path]:
    """Run protoc on :data:`PROTO`; returns the written files (under ``out_root/server/registry/proto``)."""
    from grpc_tools import protoc  # dev extra only

    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{REPO}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(REPO / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {REPO / PROTO}")
    return [out_root / PROTO.parent / name for name in GENERATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="output root (default: the repository)")
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
