"""Generated protobuf/gRPC modules, produced from ``proto/`` by grpc_tools on first use (never committed).

``python -m services.protos`` regenerates them explicitly. The output folder carries a hash of the
.proto sources, so editing a .proto regenerates on the next import. When the package directory is
not writable (a read-only install), the stubs go to a per-user cache folder instead.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ("densecomm/v1/relay.proto", "densecomm/v1/kv.proto")


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for name in PROTO_FILES:
        digest.update((PROTO_ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def _output_dir() -> Path:
    local = Path(__file__).resolve().parent / "_generated"
    try:
        local.mkdir(exist_ok=True)
        probe = local / ".write-test"
        probe.touch()
        probe.unlink()
        return local
    except OSError:
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "densecomm" / "protos"


def generate(out: Path | None = None) -> Path:
    """Run protoc (from grpcio-tools) on every .proto into ``out``; returns the folder."""
    from grpc_tools import protoc

    out = out or _output_dir()
    stamp = out / "SOURCES_HASH"
    wanted = _sources_hash()
    if stamp.exists() and stamp.read_text() == wanted:
        return out
    staging = Path(tempfile.mkdtemp(prefix="protos-", dir=out.parent if out.parent.exists() else None))
    try:
        include = Path(protoc.__file__).resolve().parent / "_proto"
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={staging}",
                f"--grpc_python_out={staging}", f"--pyi_out={staging}", *[str(PROTO_ROOT / f) for f in PROTO_FILES]]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_FILES} (see its output above)")
        out.mkdir(parents=True, exist_ok=True)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)  # atomic per file
        (out / "SOURCES_HASH").write_text(wanted)  # last: a reader that sees the stamp sees every stub
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """(relay_pb2, relay_pb2_grpc, kv_pb2, kv_pb2_grpc), generating them first if needed."""
    out = generate()
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    names = ("densecomm.v1.relay_pb2", "densecomm.v1.relay_pb2_grpc", "densecomm.v1.kv_pb2", "densecomm.v1.kv_pb2_grpc")
    return tuple(importlib.import_module(n) for n in names)  # type: ignore[return-value]


if __name__ == "__main__":
    print(generate())
