"""The shape of the house, checked from the source (no model is loaded, nothing is served).

- Arrows point one way (DESIGN.md, "The house"): the worker imports no grpc, protobuf, HTTP or
  service code; the client imports no worker or service code and no torch when imported; the
  service imports no client code; the wire package (cispo.v1) imports none of them.
- No import cycles among cispo modules.
- The generated protobuf code is what protos/generate.py makes of the .proto today.
- Every `# noqa` and `# type: ignore` in product code names its rule(s) and says why after them.
- No blanket escapes in pyproject's [tool.mypy].

Imports are read with `ast` from every product file, at any depth: module level, in functions,
in `try` blocks. An import inside a function counts as an edge like any other: it runs, and
deferring it hides a cycle without removing it. An import under `if TYPE_CHECKING:` never runs,
so it makes no runtime cycle and is left out of the cycle graph; it still counts for the
direction rules (a type from the wrong side of a seam is a dependency on that side). One
exception, by design: the client may import torch inside the functions that hand tensors to a
user who asks for torch (`TensorData.to_torch`, `forward_backward_custom`); importing
`cispo.client` never imports torch, which a subprocess checks too.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent
# Top-level folder -> the cispo package it holds (import paths are file paths).
PACKAGE_ROOTS = {
    "worker": "cispo.worker",
    "service": "cispo.service",
    "client_py": "cispo.client",
    "protos": "cispo.v1",
}
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")


def _module_name(path: Path) -> str:
    """worker/cispo/worker/engine.py -> cispo.worker.engine; .../__init__.py -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts[1:])
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


PRODUCT_FILES = {
    _module_name(p): p
    for top, package in PACKAGE_ROOTS.items()
    for p in sorted((ROOT / top / Path(*package.split("."))).rglob("*.py"))
}


@dataclass(frozen=True)
class Import:
    """One imported name: `import a.b` gives a.b; `from a import b` gives a.b (a module or not)."""

    importer: str
    target: str
    line: int
    in_function: bool
    type_checking_only: bool

    def where(self) -> str:
        return f"{PRODUCT_FILES[self.importer].relative_to(ROOT)}:{self.line}"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.imports: list[Import] = []
        self._function_depth = 0
        self._type_checking_depth = 0

    def _add(self, target: str, node: ast.stmt) -> None:
        self.imports.append(
            Import(self.module, target, node.lineno, self._function_depth > 0, self._type_checking_depth > 0)
        )

    def _in_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._function_depth += 1
        self.generic_visit(node)
        self._function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self._type_checking_depth += 1
        for child in node.body:
            self.visit(child)
        self._type_checking_depth -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.split(".")
            anchor = ".".join(package[: len(package) - node.level + 1])
            base = f"{anchor}.{base}" if base else anchor
        for alias in node.names:
            self._add(base if alias.name == "*" else f"{base}.{alias.name}", node)


def _collect_imports() -> list[Import]:
    imports = []
    for module, path in PRODUCT_FILES.items():
        collector = _ImportCollector(module, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        imports += collector.imports
    return imports


IMPORTS = _collect_imports()


def _matches(target: str, prefixes: tuple[str, ...]) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "grpc_tools")
PROTOBUF = ("google.protobuf", "google.rpc", "cispo.v1")
HTTP = ("starlette", "uvicorn", "h11", "httpx", "aiohttp", "fastapi", "requests", "tinker")
TORCH = ("torch", "transformers", "safetensors", "peft", "accelerate")


# package -> (what it may not import, why)
DIRECTIONS = {
    "cispo.worker": (GRPC + PROTOBUF + HTTP + ("cispo.service", "cispo.client"), "speaks torch and dataclasses"),
    "cispo.client": (("cispo.service", "cispo.worker"), "talks to the service only over the wire"),
    "cispo.service": (("cispo.client",), "shares only the wire (cispo.v1) with the client"),
    "cispo.v1": (("cispo.service", "cispo.worker", "cispo.client"), "is the contract both sides import"),
}


@pytest.mark.parametrize("package", DIRECTIONS)
def test_imports_point_one_way(package):
    forbidden, why = DIRECTIONS[package]
    wrong = [
        f"{i.where()}: {i.target}"
        for i in IMPORTS
        if _matches(i.importer, (package,)) and _matches(i.target, forbidden)
    ]
    assert not wrong, f"{package} {why}, but imports:\n  " + "\n  ".join(wrong)


def test_client_imports_no_torch_when_imported():
    """Only the functions that hand a user torch tensors may import torch, and only when called."""
    wrong = [
        f"{i.where()}: {i.target}"
        for i in IMPORTS
        if _matches(i.importer, ("cispo.client", "cispo.v1")) and _matches(i.target, TORCH) and not i.in_function
    ]
    assert not wrong, "cispo.client needs only numpy, grpc and protobuf, but imports at import time:\n  " + "\n  ".join(
        wrong
    )
    probe = (
        "import sys, cispo.client, cispo.v1.training_pb2_grpc; print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    heavy = [name for name in TORCH if f"'{name}'" in loaded]
    assert not heavy, f"`import cispo.client` loads {heavy} (through another package)"


def _import_graph() -> dict[str, dict[str, Import]]:
    """importer -> {imported cispo module -> the first import of it}, run-time imports only.

    `from a.b import c` is an edge to a.b.c when that is a module, else to a.b; an import of a
    submodule is not an edge to its parent package's __init__ (Python runs it, but a package that
    re-exports its modules would otherwise be a cycle with each of them)."""
    graph: dict[str, dict[str, Import]] = {module: {} for module in PRODUCT_FILES}
    for i in IMPORTS:
        if i.type_checking_only:
            continue
        target = i.target
        while target and target not in PRODUCT_FILES:
            target = target.rpartition(".")[0]
        if target and target != i.importer:
            graph[i.importer].setdefault(target, i)
    return graph


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return components


def test_no_import_cycles():
    graph = _import_graph()
    report = []
    for component in _cycles(graph):
        members = set(component)
        edges = [f"    {i.where()}: imports {t}" for m in component for t, i in graph[m].items() if t in members]
        report.append(" <-> ".join(component) + "\n" + "\n".join(edges))
    assert not report, "import cycles (an import inside a function counts; one under TYPE_CHECKING does not):\n  " + (
        "\n  ".join(report)
    )


def test_cycle_finder_finds_a_cycle():
    """The checker itself: a -> b -> c -> a is one cycle; d -> a is outside it."""
    edge = Import("x", "y", 1, False, False)
    graph = {"a": {"b": edge}, "b": {"c": edge}, "c": {"a": edge}, "d": {"a": edge}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _load_generate():
    spec = importlib.util.spec_from_file_location("protos_generate", ROOT / "protos" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_protobuf_code_matches_the_proto():
    stale = _load_generate().stale_files()
    assert not stale, f"stale generated code: {stale}; run `python protos/generate.py` and commit the result"


NOQA = re.compile(r"#\s*noqa\b(?P<codes>:\s*[A-Z]+[0-9]+(?:\s*,\s*[A-Z]+[0-9]+)*)?(?P<rest>.*)", re.IGNORECASE)
TYPE_IGNORE = re.compile(r"#\s*type:\s*ignore\b(?P<codes>\[\s*[a-z0-9-]+(?:\s*,\s*[a-z0-9-]+)*\s*\])?(?P<rest>.*)")


def _suppression_problem(comment: str) -> str | None:
    """Why this comment's `# noqa` / `# type: ignore` is not `... CODE  # reason`; None if it is."""
    for pattern, what in ((NOQA, "noqa"), (TYPE_IGNORE, "type: ignore")):
        found = pattern.search(comment)
        if found is None:
            continue
        if not found["codes"]:
            return f"`# {what}` names no rule"
        if not re.search(r"[A-Za-z]{2}", found["rest"]):
            return f"`# {what}` gives no reason after its rule(s)"
    return None


def test_suppression_parser():
    good = "# noqa: E402  # grpc must be imported after the env var is set"
    assert _suppression_problem(good) is None
    assert _suppression_problem("# type: ignore[attr-defined]  # peft adds it") is None
    assert _suppression_problem("# noqa: E731, B023 - bound per call") is None
    assert "names no rule" in _suppression_problem("# noqa")
    assert "names no rule" in _suppression_problem("# type: ignore  # because")
    assert "no reason" in _suppression_problem("# noqa: E402")
    assert "no reason" in _suppression_problem("# type: ignore[override]")
    assert _suppression_problem("# an ordinary comment about noqa-free code") is None


def test_every_suppression_names_its_rule_and_why():
    problems = []
    for path in PRODUCT_FILES.values():
        if GENERATED.search(path.name):
            continue
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if token.type == tokenize.COMMENT and (problem := _suppression_problem(token.string)):
                problems.append(f"{path.relative_to(ROOT)}:{token.start[0]}: {problem}: {token.string}")
    assert not problems, "write `# noqa: CODE  # why` or `# type: ignore[code]  # why`:\n  " + "\n  ".join(problems)


ALLOWED_IGNORE_ERRORS = {"cispo.v1.training_pb2_grpc"}  # grpc's generated stubs; training_pb2.pyi is checked


def _mypy_escapes(mypy: dict) -> list[str]:
    """Settings in a [tool.mypy] table that switch the checker off for product code."""
    problems = []
    for key in ("ignore_errors", "ignore_missing_imports"):
        if mypy.get(key):
            problems.append(f"[tool.mypy] {key} = true (for every module)")
    if mypy.get("follow_imports") in ("skip", "silent"):
        problems.append(f"[tool.mypy] follow_imports = {mypy['follow_imports']!r}")
    for override in mypy.get("overrides", []):
        modules = override.get("module", [])
        modules = [modules] if isinstance(modules, str) else modules
        ours = [m for m in modules if m.split(".")[0] == "cispo"]
        if override.get("follow_imports") in ("skip", "silent"):
            problems.append(f"follow_imports = {override['follow_imports']!r} for {modules}")
        if override.get("ignore_errors") and set(ours) - ALLOWED_IGNORE_ERRORS:
            problems.append(f"ignore_errors for {sorted(set(ours) - ALLOWED_IGNORE_ERRORS)}")
        if override.get("ignore_missing_imports") and ours:
            problems.append(f"ignore_missing_imports for {ours} (a broken cispo import would pass)")
    unchecked = [
        str(path.relative_to(ROOT))
        for path in PRODUCT_FILES.values()
        if not GENERATED.search(path.name)
        and any(re.search(pattern, str(path.relative_to(ROOT))) for pattern in mypy.get("exclude", []))
    ]
    if unchecked:
        problems.append(f"[tool.mypy] exclude skips product files {unchecked}")
    files = mypy.get("files", [])
    missing = [f"{top}/cispo" for top in PACKAGE_ROOTS if f"{top}/cispo" not in files]
    if missing:
        problems.append(f"[tool.mypy] files does not cover {missing}")
    return problems


def test_mypy_has_no_blanket_escapes():
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    problems = _mypy_escapes(mypy)
    assert not problems, "pyproject.toml's [tool.mypy] switches the checker off:\n  " + "\n  ".join(problems)


def test_mypy_escape_finder():
    """The checker itself flags what it should, and lets the generated grpc stubs' override pass."""
    base = {"files": [f"{top}/cispo" for top in PACKAGE_ROOTS]}
    assert (
        _mypy_escapes({**base, "overrides": [{"module": ["cispo.v1.training_pb2_grpc"], "ignore_errors": True}]}) == []
    )
    assert _mypy_escapes({**base, "overrides": [{"module": "cispo.worker.*", "ignore_errors": True}]})
    assert _mypy_escapes({**base, "overrides": [{"module": ["transformers.*"], "follow_imports": "skip"}]})
    assert _mypy_escapes({**base, "ignore_errors": True})
    assert _mypy_escapes({**base, "exclude": ["engine\\.py$"]})
    assert _mypy_escapes({"files": ["worker/cispo"]})


def test_the_worker_and_the_wire_codec_agree_on_what_they_both_define():
    """The worker may not import cispo.v1, and the client may not import the worker, so the
    loss inputs, the AdamParams defaults and the `ranges` helper are written on both sides of
    that line; here they are held equal."""
    import dataclasses
    import inspect

    from cispo.v1 import datum_reader, tensors
    from cispo.worker import batch, optimizer

    assert tensors.LOSS_INPUT_KINDS == batch.LOSS_INPUT_KINDS
    assert dataclasses.asdict(optimizer.AdamParams()) == tensors.ADAM_DEFAULTS
    assert inspect.getsource(datum_reader.ranges) == inspect.getsource(batch.ranges)
