"""Regenerate the Python code beside the .proto files: `python protos/generate.py [OUT_DIR]`.

The output goes to protos/ (checked in) unless OUT_DIR is given; tests regenerate into a
temporary folder and compare, so checked-in code can never go stale.
"""

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def _include_dirs() -> list[str]:
    """protoc's well-known types plus google/rpc/*.proto from googleapis-common-protos."""
    import google.rpc

    googleapis_root = Path(next(iter(google.rpc.__path__))).parent.parent
    return [str(PROTOS), str(Path(grpc_tools.__file__).parent / "_proto"), str(googleapis_root)]


def generate(out_dir: Path) -> None:
    args = ["protoc", *(f"-I{d}" for d in _include_dirs())]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main(args + SOURCES) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTOS)
