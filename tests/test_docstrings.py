"""Every public name of `pool` is documented, Google style (Args / Returns / Attributes).

"Public": each name in a module's ``__all__`` (``pool`` itself and every ``pool/*.py`` and
``pool/containers/*.py`` module, ``pool.testing`` and ``pool.pytest_plugin`` excepted), plus the
methods and properties without a leading underscore that those classes define themselves. Checked:

1. each has a non-empty docstring of its own (a dataclass's generated signature does not count);
2. a function or method with parameters besides ``self`` / ``cls`` has an ``Args:`` section naming
   each of them (``*args`` / ``**kwargs`` included); a class's own ``__init__`` / ``__new__``
   parameters are named in the class's (or that method's) ``Args:``, a dataclass's fields in the
   class's ``Attributes:``;
3. a function whose return annotation is not None has ``Returns:`` (``Yields:`` for a generator
   or context manager); properties are exempt.

The doctest examples that are not skipped run too (`test_doctest_examples`).
"""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pool"
# Modules outside the rule: the test helpers and the pytest plugin are documented on their own
# terms (the brief excludes them); __main__ is a two-line script with no __all__.
EXCLUDED_MODULES = {"pool.testing", "pool.pytest_plugin", "pool.__main__"}
# Modules that need an optional extra: checked where they import, skipped (walk and doctests) where
# they raise ImportError. pool.fusion_bench needs Python 3.12+ and the fusion-bench extra.
OPTIONAL_MODULES = {"pool.fusion_bench"}
# Names whose parameters need not be listed, with the reason. Empty: every public signature
# documents all its parameters, *args / **kwargs included.
ARGS_EXEMPT: dict[str, str] = {}
SECTION = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        if name in OPTIONAL_MODULES:
            return False
        raise
    return True


def _module_names() -> list[str]:
    names = ["pool"]
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "pool" and name not in EXCLUDED_MODULES and _importable(name):
            names.append(name)
    return names


def _own_doc(obj: Any) -> str:
    """The object's own docstring (not inherited; a dataclass's generated one counts as none)."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if not isinstance(doc, str):
        return ""
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return inspect.cleandoc(doc)


def _public() -> Iterator[tuple[str, Any]]:
    """(qualified name, object) for every public function, class, method and property, once each."""
    seen: set[int] = set()
    for module_name in _module_names():
        module = importlib.import_module(module_name)
        assert hasattr(module, "__all__"), f"{module_name} has no __all__"
        for name in module.__all__:
            obj = getattr(module, name)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue  # constants and type aliases
            if not getattr(obj, "__module__", "").startswith("pool") or id(obj) in seen:
                continue  # re-exports are checked where they are defined
            seen.add(id(obj))
            qualname = f"{obj.__module__}.{obj.__qualname__}"
            yield qualname, obj
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_"):
                        continue
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


def _missing_args(doc: str, params: list[str]) -> list[str]:
    documented = set(sections(doc).get("Args", []))
    return [p for p in params if p not in documented]


def test_the_walk_finds_the_public_api() -> None:
    """The walk reaches the main API and its methods (a broken walk must not pass vacuously)."""
    for name in ("pool.modelpool.OpenCLIPVisionModelPool.load_model", "pool.modeling.ImageEncoder.load",
                 "pool.checkpoint.read_checkpoint", "pool.convert.convert_tree", "pool.keys.strip_ddp",
                 "pool.verify_report.VerifyReport.from_dict", "pool.containers.torchzip.TorchZip.read",
                 "pool.modeling.ImageEncoder.embed_dim"):
        assert name in IDS, name
    assert len(PUBLIC) > 200


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=IDS)
def test_has_docstring(name: str, obj: Any) -> None:
    assert _own_doc(obj), f"{name} has no docstring"


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=IDS)
def test_args_are_documented(name: str, obj: Any) -> None:
    if isinstance(obj, property) or name in ARGS_EXEMPT:
        return
    doc = _own_doc(obj)
    if inspect.isclass(obj):
        if dataclasses.is_dataclass(obj):
            fields = [f.name for f in dataclasses.fields(obj) if f.init]
            listed = set(sections(doc).get("Attributes", []))
            missing = [f for f in fields if f not in listed]
            assert not missing, f"{name}: the Attributes section does not list the fields {missing}"
            return
        if getattr(obj, "_is_protocol", False):
            return  # a typing.Protocol's __init__ is typing's own (*args, **kwargs), not an API
        for method in ("__init__", "__new__"):
            fn = vars(obj).get(method)
            if fn is None:
                continue
            fn = fn.__func__ if isinstance(fn, staticmethod) else fn
            missing = _missing_args(doc + "\n" + _own_doc(fn), _parameters(fn))
            assert not missing, f"{name}.{method}: the Args section does not name {missing}"
        return
    missing = _missing_args(doc, _parameters(obj))
    assert not missing, f"{name}: the Args section does not name {missing}"


@pytest.mark.parametrize(("name", "obj"), PUBLIC, ids=IDS)
def test_returns_are_documented(name: str, obj: Any) -> None:
    if isinstance(obj, property) or inspect.isclass(obj):
        return
    annotation = inspect.signature(obj).return_annotation
    if annotation in (inspect.Signature.empty, None, "None"):
        return
    titles = sections(_own_doc(obj))
    assert "Returns" in titles or "Yields" in titles, f"{name} returns {annotation}: no Returns section"


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


def test_the_checks_catch_a_missing_docstring() -> None:
    """Each check fails for a function stripped of its docstring or of its sections."""
    from pool.checkpoint import read_checkpoint

    doc = _own_doc(read_checkpoint)
    assert not _missing_args(doc, _parameters(read_checkpoint))
    assert _missing_args("Read a checkpoint.", _parameters(read_checkpoint)) == [
        "path", "map_location", "mmap", "refuse_unsafe", "cache_dir", "allow_globals"]
    assert "Returns" in sections(doc) and "Returns" not in sections("Read a checkpoint.")

    def undocumented(x: int) -> int:
        return x

    assert not _own_doc(undocumented)


def test_doctest_examples() -> None:
    """The examples that are not marked ``+SKIP`` run and print what they show."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "--doctest-modules", "pool", "-q", "-p", "no:cacheprovider",
               "--ignore=pool/testing.py", "--ignore=pool/pytest_plugin.py"]
    command += [f"--ignore={name.replace('.', '/')}.py" for name in sorted(OPTIONAL_MODULES)
                if not _importable(name)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
