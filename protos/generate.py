"""Regenerate the Python code beside the .proto files: `python protos/generate.py [--out DIR | --check]`.

The output goes to protos/ (checked in) unless `--out DIR` is given. `--check` regenerates into a
temporary folder and exits 1 naming every checked-in file that differs (tests/test_structure.py
runs the same `stale_files()`), so checked-in code can never go stale.
"""

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
SOURCES = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
GENERATED_PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py")


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


def _generated_files(root: Path) -> set[Path]:
    """The generated files under root, relative to it (e.g. cispo/v1/training_pb2.py)."""
    return {p.relative_to(root) for pattern in GENERATED_PATTERNS for p in root.rglob(pattern)}


def stale_files() -> list[str]:
    """Checked-in generated files that differ from a fresh generation, are missing, or are left over."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root)
        fresh, checked_in = _generated_files(fresh_root), _generated_files(PROTOS)
        stale = [f"{p} (missing)" for p in fresh - checked_in]
        stale += [f"{p} (no .proto generates it)" for p in checked_in - fresh]
        stale += [
            f"{p} (differs)" for p in fresh & checked_in if not filecmp.cmp(fresh_root / p, PROTOS / p, shallow=False)
        ]
    return sorted(stale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, default=PROTOS, help="write the generated code here (default: protos/)")
    target.add_argument("--check", action="store_true", help="write nothing; exit 1 if checked-in code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(args.out)
        return
    stale = stale_files()
    for name in stale:
        print(f"stale: protos/{name}", file=sys.stderr)
    if stale:
        raise SystemExit("run `python protos/generate.py` (or `make protos`) and commit the result")


if __name__ == "__main__":
    main()
