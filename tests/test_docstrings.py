"""The public surface of `pool` is documented (docs/design.md §1 says what is public).

"Public" is what README.md documents: each name in ``pool.__all__`` (the errors included), the
lower-level entry points the README names beside them (`README_ENTRY_POINTS`), and the methods and
properties without a leading underscore that those classes define themselves. Checked:

1. each has a non-empty docstring of its own (a dataclass's generated signature does not count);
   one line is enough where one line says it all;
2. where a docstring has an ``Args:`` section, it names every parameter (``*args`` / ``**kwargs``
   included) and nothing that is no parameter: a half-written section misleads more than none; a
   dataclass's ``Attributes:``, where there is one, lists its fields;
3. every module of the package has a module docstring saying what it is for.

The doctest examples that are not skipped run too (`test_doctest_examples`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pool

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pool"
# Modules that need an optional extra: checked where they import, skipped where they raise
# ImportError. pool.fusion_bench needs Python 3.12+ and the fusion-bench extra.
OPTIONAL_MODULES = {"pool.fusion_bench"}
# The README's lower-level entry points beside ``pool.__all__``.
README_ENTRY_POINTS = ("pool.checkpoint.load_state_dict", "pool.fusion_bench.OpenCLIPVisionModelPool")
SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        if name in OPTIONAL_MODULES:
            return False
        raise
    return True


def _module_paths() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _own_doc(obj: Any) -> str:
    """The object's own docstring (not inherited; a dataclass's generated one counts as none)."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not isinstance(doc, str):
        return ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return inspect.cleandoc(doc)


def _surface() -> Iterator[Any]:
    for name in pool.__all__:
        yield getattr(pool, name)
    for dotted in README_ENTRY_POINTS:
        module, _, attr = dotted.rpartition(".")
        if _importable(module):
            yield getattr(importlib.import_module(module), attr)


def _public() -> Iterator[tuple[str, Any]]:
    """(qualified name, object) for every public function, class, method and property, once each."""
    seen: set[int] = set()
    for obj in _surface():
        if not (inspect.isfunction(obj) or inspect.isclass(obj)) or id(obj) in seen:
            continue  # constants (__version__)
        seen.add(id(obj))
        qualname = f"{obj.__module__}.{obj.__qualname__}"
        yield qualname, obj
        if inspect.isclass(obj):
            yield from _methods(obj, qualname)


def _methods(cls: type, qualname: str) -> Iterator[tuple[str, Any]]:
    """The public methods and properties of ``cls``, those it inherits from pool's own classes included
    (the pool's table methods live on a base class)."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("pool"):
            continue
        for attr, value in vars(klass).items():
            if attr.startswith("_") or attr in seen:
                continue
            seen.add(attr)
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property) or inspect.isfunction(value):
                yield f"{qualname}.{attr}", value


PUBLIC = sorted(_public(), key=lambda item: item[0])
IDS = [name for name, _ in PUBLIC]


def sections(doc: str) -> dict[str, list[str]]:
    """Google-style sections of a docstring: section title -> the names its entries document.

    An entry is a line at the section body's first indentation, ``name: text`` or
    ``name (type): text``; several names may share one (``pool, models, heads: ...``) and
    ``*args`` / ``**kwargs`` keep their stars off.
    """
    out: dict[str, list[str]] = {}
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        match = SECTION.match(lines[i])
        if not match:
            i += 1
            continue
        indent, title = len(match.group(1)), match.group(2)
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
            body.append(lines[i])
            i += 1
        names: list[str] = []
        entry_indent = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
        for line in body:
            if line.strip() and len(line) - len(line.lstrip()) == entry_indent and ":" in line:
                head = re.sub(r"\(.*?\)", "", line.split(":", 1)[0])
                names += [n.strip().lstrip("*") for n in head.split(",") if n.strip()]
        out.setdefault(title, []).extend(names)
    return out


def _parameters(fn: Callable[..., Any]) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    return [p.name for p in params]


def _args_problems(doc: str, params: list[str]) -> list[str]:
    """What is wrong with ``doc``'s Args section for ``params``: nothing when it has none."""
    titles = sections(doc)
    if "Args" not in titles:
        return []  # one line says it all
    documented = set(titles["Args"])
    return ([f"does not name {p}" for p in params if p not in documented]
            + [f"names {d}, which is no parameter" for d in sorted(documented - set(params))])


def test_the_walk_finds_the_public_api() -> None:
    """The walk reaches the main API and its methods (a broken walk must not pass vacuously)."""
    for name in ("pool.modelpool.OpenCLIPVisionModelPool.load_model", "pool.checkpoint.load_state_dict",
                 "pool.checkpoint.read_checkpoint", "pool.verify_report.VerifyReport.from_dict",
                 "pool.errors.CheckpointNotFoundError"):
        assert any(i.endswith(name.partition(".")[2].partition(".")[2]) for i in IDS), name
    assert any(i.endswith("ImageEncoder.load") for i in IDS)
    assert any(i.endswith("OpenCLIPVisionModelPool.from_config") for i in IDS)  # inherited from its base
    assert len(PUBLIC) > 40


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=IDS)
def test_has_docstring(name: str, obj: Any) -> None:
    assert _own_doc(obj), f"{name} has no docstring"


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=IDS)
def test_args_sections_are_whole(name: str, obj: Any) -> None:
    if isinstance(obj, property):
        return
    doc = _own_doc(obj)
    if not inspect.isclass(obj):
        assert _args_problems(doc, _parameters(obj)) == [], name
        return
    if dataclasses.is_dataclass(obj):
        listed = sections(doc).get("Attributes")
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        assert listed is None or not [f for f in fields if f not in listed], f"{name}: Attributes misses fields"
        return
    if getattr(obj, "_is_protocol", False):
        return  # a typing.Protocol's __init__ is typing's own (*args, **kwargs), not an API
    for method in ("__init__", "__new__"):
        fn = vars(obj).get(method)
        if fn is not None:
            fn = fn.__func__ if isinstance(fn, staticmethod) else fn
            assert _args_problems(doc + "\n" + _own_doc(fn), _parameters(fn)) == [], f"{name}.{method}"


@pytest.mark.parametrize("module", sorted(_module_paths()))
def test_every_module_says_what_it_is_for(module: str) -> None:
    assert ast.get_docstring(ast.parse(_module_paths()[module].read_text())), f"{module}: no module docstring"


def test_sections_parser() -> None:
    doc = inspect.cleandoc("""Do it.

        Args:
            pool, models, heads: what prepare_pool returned.
            name (str): a name,
                continued: on the next line.
            **kwargs: passed on.

        Returns:
            Something.
        """)
    assert sections(doc) == {"Args": ["pool", "models", "heads", "name", "kwargs"], "Returns": []}


def test_the_checks_catch_a_half_written_args_section() -> None:
    """A one-line docstring passes; an Args section that misses or invents a parameter does not."""

    def documented(path: str, mmap: bool) -> int:
        """Read it."""
        return 0

    params = _parameters(documented)
    assert _args_problems(_own_doc(documented), params) == []
    half = "Read it.\n\nArgs:\n    path: the file.\n    map: a typo.\n"
    assert _args_problems(half, params) == ["does not name mmap", "names map, which is no parameter"]

    def undocumented(x: int) -> int:
        return x

    assert not _own_doc(undocumented)


def test_doctest_examples() -> None:
    """The examples that are not marked ``+SKIP`` run and print what they show."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "--doctest-modules", "pool", "-q", "-p", "no:cacheprovider",
               "--ignore=pool/testing.py", "--ignore=pool/pytest_plugin.py", "--ignore=pool/__main__.py"]
    command += [f"--ignore={name.replace('.', '/')}.py" for name in sorted(OPTIONAL_MODULES)
                if not _importable(name)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
