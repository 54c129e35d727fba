"""Generate Python gRPC stubs next to the .proto files (run by `make install`).

protoc writes absolute imports (`import x_pb2`); they are rewritten to package-relative
ones so the stubs live inside `progsae.proto`.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(out: Path = HERE) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # noqa: PLC0415  (build-time dependency only)

    protos = sorted(HERE.glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for p in protos:
        args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
                f"--pyi_out={out}", str(p)]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {p}")
    written = sorted(out.glob("*_pb2*.py")) + sorted(out.glob("*_pb2.pyi"))
    for f in written:
        src = f.read_text()
        fixed = re.sub(r"^import (\w+_pb2) as", r"from . import \1 as", src, flags=re.M)
        # Message classes must name their real module (progsae.proto.x_pb2), or pickling them
        # (Ray Serve ships requests between processes) looks for a top-level `x_pb2`.
        fixed = re.sub(r"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '\w+', _globals\)",
                       "BuildTopDescriptorsAndMessages(DESCRIPTOR, __name__, _globals)", fixed)
        if fixed != src:
            f.write_text(fixed)
    return written


if __name__ == "__main__":
    for f in build():
        print(f"generated {f.name}", file=sys.stderr)
