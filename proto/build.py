"""Generate the Python gRPC stubs of the wire contract (dev tool: `make stubs`).

    python proto/build.py           # (re)write proto/progsae/v1/progsae_pb2*.py{,i}
    python proto/build.py --check   # exit 1 if the committed stubs differ from what protoc makes

The .proto sits at the path of its Python module (`proto/progsae/v1/progsae.proto` is
`progsae.v1.progsae_pb2`, package progsae.v1), so protoc's output is used as it is. The stubs
are committed: a wheel or sdist needs no grpcio-tools, and `--check` (run by the test suite)
keeps them fresh.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = sorted(ROOT.glob("progsae/*/*.proto"))


def build(out: Path = ROOT) -> list[Path]:
    """Run protoc on every .proto under proto/progsae, writing below `out`; the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for p in PROTOS:
        args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                f"--pyi_out={out}", str(p.relative_to(ROOT))]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {p}")
    return sorted(f for p in PROTOS for f in (out / p.relative_to(ROOT)).parent.glob(f"{p.stem}_pb2*"))


def stale() -> list[str]:
    """Committed stubs that differ from a fresh protoc run (relative paths)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build(Path(tmp))
        return [str(f.relative_to(tmp)) for f in fresh
                if not (ROOT / f.relative_to(tmp)).is_file()
                or (ROOT / f.relative_to(tmp)).read_bytes() != f.read_bytes()]


if __name__ == "__main__":
    if "--check" in sys.argv[1:]:
        bad = stale()
        if bad:
            sys.exit(f"stale gRPC stubs (run `make stubs`): {', '.join(bad)}")
        print("stubs are fresh", file=sys.stderr)
    else:
        for f in build():
            print(f"generated {f.relative_to(ROOT)}", file=sys.stderr)
