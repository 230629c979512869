"""Reading pool configs within bounds, the data-only mode, and keeping environment values out of reports.

Three guards, used by `pool.modelpool.OpenCLIPVisionModelPool.from_config`:

* `load_yaml_config` reads a YAML file within bounds in every mode: at most `MAX_CONFIG_BYTES`
  bytes and `MAX_CONFIG_NODES` nodes *with aliases expanded* (PyYAML shares an aliased node,
  OmegaConf copies it, so a "billion laughs" file of a few hundred bytes would otherwise hang),
  nested at most `MAX_CONFIG_DEPTH` deep. Past a bound it is a `ConfigError`, before OmegaConf
  sees the file.
* `check_data_only` is the data-only mode (``instantiate=False``, ``verify --no-instantiate``)
  for configs from outside: it refuses Hydra's keys (``_target_`` and the keys that steer a call)
  anywhere, and every interpolation that calls a resolver (``${oc.env:...}``, ``${oc.decode:...}``,
  custom ones); plain ``${a.b}`` references stay. It reads the raw config, before anything is
  resolved or instantiated.
* `Redactor` replaces the values a config took from the environment (``${oc.env:NAME}``) by that
  interpolation's text, in every report string.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
import yaml.reader
from omegaconf import DictConfig, ListConfig, OmegaConf, grammar_parser
from omegaconf._utils import get_yaml_loader
from omegaconf.errors import GrammarParseError
from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as Grammar

from .errors import ConfigError, PoolError, amended, printable

__all__ = ["MAX_CONFIG_BYTES", "MAX_CONFIG_NODES", "MAX_CONFIG_DEPTH", "HYDRA_KEYS", "load_yaml_config", "yaml_problem",
           "check_data_only", "resolved_data", "raw_container", "env_secrets", "Redactor", "redact_strings"]

#: The largest pool config file read, in bytes (a pool of 2,000 entries is about 120 KiB).
MAX_CONFIG_BYTES = 256 * 1024
#: The most YAML nodes (keys and values) a config may have once its aliases are expanded.
MAX_CONFIG_NODES = 25_000
#: The deepest nesting of mappings and lists (a pool config nests about 4 deep).
MAX_CONFIG_DEPTH = 64
#: Hydra's reserved keys: each makes ``instantiate`` import or call something, or steers that call.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")

_TRUSTED_ONLY = "drop --no-instantiate (instantiate=False) only for a config you trust"
_MIN_SECRET = 3  # shorter environment values are not redacted: they would garble every report


# -- bounded YAML ------------------------------------------------------------------------------------
def _read_bounded(path: Path) -> str:
    """The file's text, refused past `MAX_CONFIG_BYTES` (read at most one byte more)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path.absolute()}: cannot read the pool config: {exc.strerror or exc}") from exc
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path.absolute()}: the pool config is larger than {MAX_CONFIG_BYTES:,} bytes, the "
                          "most pool reads; a pool config lists checkpoint paths and is a few KiB. Check that "
                          "this is the right file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path.absolute()}: the pool config is not UTF-8 text ({exc}); save it as UTF-8.") from exc


def _expanded_size(node: Any, where: str) -> int:
    """Nodes under ``node`` with every alias expanded, as OmegaConf would copy them; a shared node
    is counted once per use but visited once (memo), so a billion-laughs graph costs its own size."""
    memo: dict[int, int] = {}

    def size(item: Any, depth: int) -> int:
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: the pool config nests deeper than {MAX_CONFIG_DEPTH} levels (or an "
                              "alias refers to a node that contains it); flatten it.")
        key = id(item)
        if key not in memo:
            total = 1
            if isinstance(item.value, list):
                for child in item.value:
                    pair = child if isinstance(child, tuple) else (child,)
                    total += sum(size(part, depth + 1) for part in pair)
                    if total > MAX_CONFIG_NODES:
                        break
            memo[key] = total
        return memo[key]

    return size(node, 0)


def _too_many(where: str, found: str) -> ConfigError:
    return ConfigError(f"{where}: the pool config has {found} YAML nodes with its aliases (*name) expanded; "
                       f"pool reads at most {MAX_CONFIG_NODES:,}. Nested anchors and aliases multiply "
                       "(a 'billion laughs' file); write the entries out instead of aliasing aliases.")


def _counting_loader(where: str) -> type:
    """OmegaConf's YAML loader, stopping once it has composed more than `MAX_CONFIG_NODES` nodes."""
    class CountingLoader(get_yaml_loader()):  # type: ignore[misc]
        composed = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.composed += 1
            if self.composed > MAX_CONFIG_NODES:
                raise _too_many(where, f"more than {MAX_CONFIG_NODES:,}")
            return super().compose_node(parent, index)

    return CountingLoader


def _parse_bounded(text: str, where: str) -> Any:
    """The YAML document in ``text`` as Python data, within the node and depth bounds."""
    loader = _counting_loader(where)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        total = _expanded_size(node, where)
        if total > MAX_CONFIG_NODES:
            raise _too_many(where, f"more than {MAX_CONFIG_NODES:,}")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _one_line(text: str) -> str:
    """``text`` on one line: its lines joined by ``; ``, runs of blanks as one space."""
    return "; ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())


def _position(mark: Any) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}"


def yaml_problem(exc: BaseException, text: str | None = None) -> str:
    """A YAML parser's error on one line: the problem and its position, then what was being
    parsed and where (PyYAML's own text spans several lines and quotes the source's lines).

    Args:
        exc: the exception the parser raised.
        text: the document parsed, to tell the line and column of a character the reader refused
            (PyYAML gives its offset only).

    Returns:
        One line such as ``line 3, column 4: expected ',' or ']', but got ':' (while parsing a
        flow sequence at line 2, column 6)``; for another exception, its text on one line.

    Example:
        >>> import yaml
        >>> try:
        ...     yaml.safe_load("a: [1, 2\\nb: 3\\n")
        ... except yaml.YAMLError as exc:
        ...     print(yaml_problem(exc))
        line 2, column 2: expected ',' or ']', but got ':' (while parsing a flow sequence at line 1, column 4)
    """
    if isinstance(exc, yaml.reader.ReaderError) and isinstance(exc.character, int):
        where = f"offset {exc.position}"
        if text is not None and 0 <= exc.position <= len(text):
            line, line_start = text.count("\n", 0, exc.position) + 1, text.rfind("\n", 0, exc.position) + 1
            where = f"line {line}, column {exc.position - line_start + 1}"
        return f"{where}: unacceptable character #x{exc.character:04x}: {_one_line(str(exc.reason))}"
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not isinstance(exc, yaml.MarkedYAMLError) or problem is None:
        return _one_line(str(exc)) or type(exc).__name__
    text = f"{_position(mark)}: {problem}" if mark is not None else str(problem)
    context, context_mark = exc.context, exc.context_mark
    if context:
        where = f" at {_position(context_mark)}" if context_mark is not None else ""
        text += f" ({context}{where})"
    return _one_line(text)


def load_yaml_config(path: str | Path) -> Any:
    """Read a pool config file into a DictConfig, within bounds; nothing is resolved.

    Args:
        path: the YAML file (``~`` is expanded).

    Returns:
        The DictConfig (a ListConfig for a file whose top level is a list), interpolations unresolved.

    Raises:
        ConfigError: the file cannot be read, is larger than `MAX_CONFIG_BYTES`, has more than
            `MAX_CONFIG_NODES` nodes with its aliases expanded or nests deeper than
            `MAX_CONFIG_DEPTH`, is no valid YAML, or its top level is a scalar.

    Example:
        >>> config = load_yaml_config("pool.yaml")  # doctest: +SKIP
    """
    file = Path(path).expanduser()
    where = str(file.absolute())
    text = _read_bounded(file)
    try:
        data = _parse_bounded(text, where)
    except PoolError:
        raise
    except RecursionError as exc:  # PyYAML composes recursively
        raise ConfigError(f"{where}: the pool config nests too deep to read; flatten it.") from exc
    except Exception as exc:  # YAML errors: one clear message
        raise ConfigError(f"{where}: not a valid YAML pool config: {yaml_problem(exc, text)}") from exc
    if data is None:
        return OmegaConf.create()
    if not isinstance(data, (dict, list)):  # OmegaConf would parse a string as YAML once more, unbounded
        raise ConfigError(f"pool config {where}: the top level is a {type(data).__name__}; a pool config is a "
                          "mapping with models: and classification_heads: sections")
    try:
        return OmegaConf.create(data)
    except Exception as exc:  # OmegaConf's own checks (unsupported key types, ...)
        raise ConfigError(f"{where}: not a valid pool config: {_one_line(str(exc))}") from exc


# -- the raw config ----------------------------------------------------------------------------------
def raw_container(config: Any) -> Any:
    """The config as plain data with every interpolation left as written (nothing resolved).

    Args:
        config: a DictConfig or ListConfig (anything else is returned as it is).

    Returns:
        Plain dicts and lists holding the config's raw text.
    """
    if isinstance(config, (DictConfig, ListConfig)):
        return OmegaConf.to_container(config, resolve=False)
    return config


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any, bool]]:
    """``(path, item, is_key)`` for every key and every leaf of plain config data."""
    if isinstance(value, dict):
        for key, child in value.items():
            where = f"{path}.{key}" if path else str(key)
            yield where, key, True
            yield from _walk(child, where)
    elif isinstance(value, (list, tuple)):
        for index, child in enumerate(value):
            yield from _walk(child, f"{path}[{index}]")
    else:
        yield path, value, False


def _resolver_calls(text: str) -> list[tuple[str, Any]]:
    """``(resolver name, its parse-tree node)`` for every resolver call in an interpolated string,
    nested ones included (``${a.${oc.env:B}}``); escaped ``\\${`` is text."""
    calls: list[tuple[str, Any]] = []
    stack = [grammar_parser.parse(text)]
    while stack:
        tree = stack.pop()
        if isinstance(tree, Grammar.InterpolationResolverContext):
            calls.append((tree.resolverName().getText(), tree))
        stack.extend(tree.getChildren() if hasattr(tree, "getChildren") else [])
    return calls


def check_data_only(config: Any, where: str) -> None:
    """Refuse what would run code or read the environment: the data-only mode's check.

    Every key at any depth is checked against `HYDRA_KEYS`, and every string for interpolations
    that call a resolver; plain ``${a.b}`` / ``${..a}`` references pass. Run it on the raw config,
    before anything is resolved or instantiated.

    Args:
        config: the raw config (a DictConfig or plain data; interpolations unresolved).
        where: how messages name the config (its file).

    Raises:
        ConfigError: a Hydra key or a resolver call, naming its key path and what to do.

    Example:
        >>> check_data_only({"models": {"a": "${root}/a.pt"}, "root": "/ckpt"}, "pool.yaml")
        >>> try:
        ...     check_data_only({"models": {"a": {"_target_": "os.system"}}}, "pool.yaml")
        ... except ConfigError as exc:
        ...     print(str(exc)[:28])
        pool.yaml: models.a._target_
    """
    for path, item, is_key in _walk(raw_container(config), ""):
        if is_key and str(item) in HYDRA_KEYS:
            raise ConfigError(
                f"{where}: {path}: {item} is refused in the data-only mode (--no-instantiate, "
                f"instantiate=False): Hydra would import and call what the config names. Give the entry "
                f"as a checkpoint path or a {{pickle_path: ...}} / {{state_dict_path: ...}} mapping; "
                f"{_TRUSTED_ONLY}.")
        if not is_key and isinstance(item, str) and "${" in item:
            _check_interpolations(item, path, where)


def _check_interpolations(text: str, path: str, where: str) -> None:
    try:
        calls = _resolver_calls(text)
    except GrammarParseError as exc:
        raise ConfigError(f"{where}: {path}: {text!r} is no valid interpolation ({exc}); write ${{a.b}} to "
                          "refer to another key, or \\${ for a literal ${.") from exc
    if calls:
        name, tree = calls[0]
        raise ConfigError(
            f"{where}: {path}: {tree.getText()!r} calls the resolver {name!r}, which the data-only mode "
            f"(--no-instantiate, instantiate=False) refuses: resolvers read the environment or run code. "
            f"Only plain ${{a.b}} references are allowed; write the value out, or {_TRUSTED_ONLY}.")


def resolved_data(config: Any, where: str) -> dict[str, Any]:
    """The data-only mode's resolution: the config resolved once into plain data.

    OmegaConf un-escapes ``\\${...}`` and joins interpolated pieces into new text; left in a
    DictConfig, a resulting ``${oc.env:...}`` would be resolved on its next access, past
    `check_data_only`. Plain data is never resolved again, and a resolved string that still
    reads as an interpolation is refused, so no later wrapping in OmegaConf can resolve it.

    Args:
        config: the checked DictConfig (`check_data_only`).
        where: how messages name the config.

    Returns:
        The resolved config as plain dicts and lists.

    Raises:
        ConfigError: a resolved string holds ``${``.
    """
    data = OmegaConf.to_container(config, resolve=True)
    for path, item, is_key in _walk(data, ""):
        if not is_key and isinstance(item, str) and "${" in item:
            raise ConfigError(f"{where}: {path}: resolves to {item!r}, which reads as another interpolation (an "
                              "escaped \\${ or pieces joined into one); the data-only mode resolves once and "
                              f"refuses it. Write the value without ${{, or {_TRUSTED_ONLY}.")
    return data


# -- environment values out of reports ---------------------------------------------------------------
def _literal(element: Any) -> str | None:
    """An argument's text when it is a literal (quoted or plain), None when it interpolates."""
    if "${" in element.getText():
        return None
    quoted = element.quotedValue() if hasattr(element, "quotedValue") else None
    if quoted is not None:
        inner = quoted.text()
        return inner.getText() if inner is not None else ""
    return element.getText().strip()


def env_secrets(config: Any) -> dict[str, str]:
    """The values a config takes from the environment, each mapped to the text that asked for it.

    Every ``${oc.env:NAME}`` (at any depth, nested in another interpolation included) whose
    ``NAME`` is literal and set contributes ``os.environ[NAME] -> "${oc.env:NAME}"``.

    Args:
        config: the raw config (nothing resolved).

    Returns:
        ``{value: interpolation text}``; values shorter than 3 characters are left out.
    """
    found: dict[str, str] = {}
    for _, item, is_key in _walk(raw_container(config), ""):
        if is_key or not isinstance(item, str) or "oc.env" not in item:
            continue
        try:
            calls = _resolver_calls(item)
        except Exception:  # noqa: BLE001 - a malformed interpolation fails at resolution, with its own error
            continue
        for name, tree in calls:
            args = tree.sequence().element() if name == "oc.env" and tree.sequence() is not None else []
            variable = _literal(args[0]) if args else None
            value = os.environ.get(variable) if variable else None
            if value is not None and len(value) >= _MIN_SECRET:
                found.setdefault(value, tree.getText())
    return found


class Redactor:
    """Replaces environment values (`env_secrets`) in text by the interpolation that asked for them.

    Each value is also matched as ``~`` expansion, path normalisation and `pool.errors.printable`
    would show it, longest first, so ``/home/me/ckpt/x.pt`` from ``${oc.env:ROOT}/x.pt`` prints as
    ``${oc.env:ROOT}/x.pt``.

    Args:
        secrets: ``{value: replacement}``, as `env_secrets` returns.

    Example:
        >>> Redactor({"/srv/private": "${oc.env:ROOT}"})("not found: /srv/private/x.pt")
        'not found: ${oc.env:ROOT}/x.pt'
    """

    def __init__(self, secrets: dict[str, str] | None = None) -> None:
        pairs: dict[str, str] = {}
        for value, shown in (secrets or {}).items():
            expanded = os.path.expanduser(value)
            for form in (value, expanded, str(Path(value)), str(Path(expanded)), printable(value)):
                if len(form) >= _MIN_SECRET:
                    pairs.setdefault(form, shown)
        self._pairs = sorted(pairs.items(), key=lambda pair: -len(pair[0]))

    def __bool__(self) -> bool:
        return bool(self._pairs)

    def __call__(self, text: str) -> str:
        """``text`` with every environment value replaced.

        Args:
            text: a message, path or report line.

        Returns:
            The text, each environment value shown as its interpolation.
        """
        for value, shown in self._pairs:
            if value in text:
                text = text.replace(value, shown)
        return text

    def error(self, exc: BaseException) -> BaseException:
        """``exc`` itself when its message holds no environment value, else a copy (same type)
        with the values replaced (`pool.errors.amended` keeps the original untouched).

        Args:
            exc: the exception to report.

        Returns:
            ``exc`` or its redacted copy, ready to ``raise ... from exc``.
        """
        if not self._pairs:
            return exc
        args = tuple(self(a) if isinstance(a, str) else a for a in exc.args)
        text = {name: getattr(exc, name, None) for name in ("strerror", "filename")}
        text = {name: self(str(v)) for name, v in text.items() if isinstance(v, (str, Path))}
        if args == exc.args and all(getattr(exc, name) == v for name, v in text.items()):
            return exc
        new = amended(exc, **text)
        new.args = args
        return new


def redact_strings(obj: Any, redact: Callable[[str], str]) -> None:
    """Apply ``redact`` in place to every string field of a report object (dataclasses, nested,
    lists of strings included), such as a `pool.verify_report.EntryResult`.

    Args:
        obj: the dataclass instance (anything else is left alone).
        redact: text -> text, such as `pool.OpenCLIPVisionModelPool.redact`.
    """
    if not is_dataclass(obj):
        return
    for spec in fields(obj):
        value = getattr(obj, spec.name)
        if isinstance(value, str):
            setattr(obj, spec.name, redact(value))
        elif isinstance(value, list) and any(isinstance(v, str) for v in value):
            setattr(obj, spec.name, [redact(v) if isinstance(v, str) else v for v in value])
        else:
            redact_strings(value, redact)
