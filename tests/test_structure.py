"""The shape of the code, held as tests (docs/design.md §1): small modules, a flat security core, data
that flows one way, one home for every exception."""

from __future__ import annotations

import ast
import builtins
import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pool
import pool.errors

PACKAGE = Path(pool.__file__).parent
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60  # in the security core
SECURITY_CORE = ("pickle_scan.py", "pickle_ops.py", "unpickler.py", "inert.py", "records.py", "record_values.py",
                 "tensors.py", "allowlist.py", "fileio.py", "containers")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")


def _imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``module`` imports anywhere (function-level imports included), except
    under ``if TYPE_CHECKING:``, which never runs."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {id(n) for block in ast.walk(tree) if _type_checking_block(block) for n in ast.walk(block)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        hits = [n for n in names if n in known]
        # ``from . import x`` names module x; ``from .m import f`` names m
        out.update(h for h in hits if h != module)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_counting_function_level_imports() -> None:
    known = _modules()
    graph = {m: _imports(m, p, known) for m, p in known.items()}
    # the package's own lazy exports (PEP 562) are string-named, not imports: pool -> x never shows up
    assert _cycles(graph) == []


def test_a_cycle_is_seen_by_the_checker() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("name", sorted(_modules()))
def test_no_module_over_the_line_limit(name: str) -> None:
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{name}: {lines} lines; split it by job (docs/design.md §1)"


def _security_core() -> list[Path]:
    paths = []
    for entry in SECURITY_CORE:
        target = PACKAGE / entry
        paths.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target])
    return paths


@pytest.mark.parametrize("path", _security_core(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_security_core_functions_are_short(path: Path) -> None:
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


@pytest.mark.skipif(shutil.which("ruff") is None and not Path(sys.executable).with_name("ruff").exists(),
                    reason="ruff is part of the [test] extra")
def test_complexity_limit_holds_under_ruff() -> None:
    """The project-wide limit (pyproject: C901 at 15) over the package, with no ``noqa`` escapes."""
    root = PACKAGE.parent
    noqa = [f"{p.relative_to(root)}:{i}" for p in PACKAGE.rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if "noqa: C901" in line]
    assert noqa == []
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "C901", "--output-format",
                           "concise", str(PACKAGE)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _is_exception_base(base: ast.expr) -> bool:
    name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else ""
    builtin = (__builtins__ if isinstance(__builtins__, dict) else vars(__builtins__)).get(name)
    known = getattr(pool.errors, name, None) or builtin
    return (isinstance(known, type) and issubclass(known, BaseException)) or name.endswith(("Error", "Exception"))


def _exception_classes_outside_errors() -> list[str]:
    """Exception classes defined anywhere in the package but errors.py (read from the source, so that a
    module that needs an optional dependency is looked at too)."""
    found = []
    for name, path in _modules().items():
        if name == "pool.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(_is_exception_base(b) for b in node.bases):
                found.append(f"{name}.{node.name}")
    return found


def test_every_exception_class_lives_in_errors() -> None:
    assert _exception_classes_outside_errors() == []


def test_public_exceptions_are_exported_from_pool_and_pool_errors() -> None:
    public = {name for name, c in inspect.getmembers(pool.errors, inspect.isclass)
              if issubclass(c, pool.errors.PoolError) and c.__module__ == "pool.errors"}
    assert public <= set(pool.errors.__all__)
    assert public <= set(pool.__all__)
    for name in public:
        assert getattr(pool, name) is getattr(pool.errors, name)


def _readme_sections() -> tuple[str, str]:
    """The README's public-API paragraph and its Errors section."""
    text = (PACKAGE.parent / "README.md").read_text()
    start = text.index("**The public API**")
    paragraph = text[start:text.index("\n\n", start)]
    errors = text[text.index("\n## Errors") + 1:]
    errors = errors[:errors.find("\n## ", 1)] if "\n## " in errors[1:] else errors
    return paragraph, errors


def test_the_public_api_is_what_the_readme_documents() -> None:
    """``pool.__all__`` and the README's list agree both ways (docs/design.md §1: what is public)."""
    paragraph, errors = _readme_sections()
    named = set(re.findall(r"`([A-Za-z_][A-Za-z_0-9]*)`", paragraph + errors))
    assert set(pool.__all__) - named == set(), "exported but not documented in the README"
    builtin = {n for n in named if isinstance(getattr(builtins, n, None), type)}
    classes = {n for n in named - builtin if n[0].isupper() and (n.endswith("Error") or n in paragraph)}
    assert classes - set(pool.__all__) == set(), "documented in the README but not exported"


def _design_file(name: str) -> Path | None:
    """A file docs/design.md names (``records.py``, ``containers/zipfmt.py``, ``pool/keys.py``, a test)."""
    root = PACKAGE.parent
    for base in (root, PACKAGE, PACKAGE / "containers", PACKAGE / "arch"):
        if (base / name).is_file():
            return base / name
    return None


def _defines(path: Path, dotted: str) -> bool:
    """Whether ``path`` defines ``dotted`` (``f``, ``Class.method``, ``CONSTANT``) at its top level."""
    scope: list[ast.stmt] = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = None
        for node in scope:
            names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                     else [t.id for t in getattr(node, "targets", [getattr(node, "target", None)])
                           if isinstance(t, ast.Name)])
            if part in names:
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def _design_references() -> list[tuple[str, str]]:
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    refs = []
    for file, names in re.findall(r"`((?:[\w]+/)*[\w]+\.py): ([\w.]+(?:`, `[\w.]+)*)`", text):
        refs += [(file, name) for name in names.split("`, `")]
    return refs


def test_design_doc_names_files_and_functions_that_exist() -> None:
    """Every ``file.py: name`` docs/design.md cites is there, so that one guess finds the code."""
    refs = _design_references()
    assert len(refs) > 40
    missing = [f"{file}: {name}" for file, name in refs
               if _design_file(file) is None or not _defines(_design_file(file), name)]
    assert missing == []
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    files = set(re.findall(r"`((?:pool/|tests/)[\w/]+\.py)", text))
    assert [f for f in files if _design_file(f) is None] == []
