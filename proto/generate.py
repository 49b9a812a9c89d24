"""Generate fluxkv/proto/*_pb2*.py from the .proto files beside this script.

    python proto/generate.py           # rewrite the generated modules
    python proto/generate.py --check   # exit 1 if they differ from a fresh run

The output depends on the grpcio-tools version, which the `dev` extra pins.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_DIR.parent / "fluxkv" / "proto"
# Map proto/ onto the Python package path so generated imports read
# `from fluxkv.proto import kv_pb2`.
VIRTUAL_ROOT = "fluxkv/proto"


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto file; return the generated files."""
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_ROOT}={PROTO_DIR}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / VIRTUAL_ROOT).glob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [f.name for f in fresh if not _same(f, PACKAGE_DIR / f.name)]
        committed = {p.name for p in PACKAGE_DIR.glob("*_pb2*.py*")}
        extra = sorted(committed - {f.name for f in fresh})
        if args.check:
            if stale or extra:
                print(f"stale generated code: {stale + extra}; run: python proto/generate.py")
                return 1
            print(f"generated code is up to date ({len(fresh)} files)")
            return 0
        for name in extra:
            (PACKAGE_DIR / name).unlink()
        for f in fresh:
            (PACKAGE_DIR / f.name).write_bytes(f.read_bytes())
        print(f"wrote {len(fresh)} files to {PACKAGE_DIR}")
    return 0


def _same(a: Path, b: Path) -> bool:
    return b.exists() and filecmp.cmp(a, b, shallow=False)


if __name__ == "__main__":
    sys.exit(main())
