"""The typed result of ``verify``: one `EntryResult` per model or head, gathered in a `VerifyReport`.

The JSON form (`VerifyReport.as_dict`, ``python -m pool verify --json``) is versioned: its
``schema`` is ``"openclip-pool/verify-report"`` and ``schema_version`` is `SCHEMA_VERSION`; a
field is added without a version change, a field renamed or removed changes the version.
docs/cli.md documents every field; `VerifyReport.from_dict` reads a report back.

Example:
    >>> report = VerifyReport.from_dict(json.load(open("report.json")))  # doctest: +SKIP
    >>> [e.label for e in report.failed]  # doctest: +SKIP
    ['models.cars']
"""

from __future__ import annotations

import json
import platform
import traceback
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import __version__
from .errors import PoolError

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Timings", "Architecture", "Integrity", "ForwardCheck", "HeadCheck",
           "TaskVector", "EntryResult", "VerifyReport", "versions"]

SCHEMA = "openclip-pool/verify-report"
#: 2: typed entries (``timings``, ``paired_head``, ``stage``); 1 (unversioned): the first report.
SCHEMA_VERSION = 2


@dataclass
class Timings:
    """Seconds spent on one entry, by step (None: the step did not run).

    With memory-mapped files ``load_s`` is the read of the file's structure and the build of the
    module; the weights' bytes are read in ``weights_s`` (every page touched once), so a cold
    page cache shows there, not in ``forward_s``.

    Attributes:
        integrity_s: the integrity pass over the file (zip CRC32s, a safetensors header; with
            ``--locked``, the file's sha256 in the same pass).
        load_s: reading the file's structure and building the module.
        weights_s: reading every weight's bytes.
        forward_s: the forward pass (a head's: its logits).
        task_vector_s: computing the task vector against ``_pretrained_``.
        lock_s: comparing the entry with the lock file (its globals read, its tensors hashed).
    """

    integrity_s: float | None = None
    load_s: float | None = None
    weights_s: float | None = None
    forward_s: float | None = None
    task_vector_s: float | None = None
    lock_s: float | None = None

    @property
    def total_s(self) -> float:
        """The seconds of the steps that ran, summed (0.0 when none did)."""
        return sum(t for t in (self.integrity_s, self.load_s, self.weights_s, self.forward_s, self.task_vector_s,
                               self.lock_s) if t)


@dataclass
class Architecture:
    """What the weights are (``inferred``: an open_clip name or a description) and what the
    config said (``configured``).

    Attributes:
        inferred: the weights' architecture: an open_clip name or a compact description.
        description: the architecture in words (`pool.arch.VisionArch.describe`).
        configured: the ``model_name`` the config gave, if any.
        matches_config: True when a configured name was checked against the weights.
        quick_gelu: the activation the model was built with (None: not known).
    """

    inferred: str | None = None
    description: str | None = None
    configured: str | None = None
    matches_config: bool | None = None
    quick_gelu: bool | None = None


@dataclass
class Integrity:
    """Whether the file's own checksums / header could be checked, and what was found.

    Attributes:
        checked: whether there was anything to check (False for legacy files and pickles).
        detail: what was checked, or why nothing could be.
    """

    checked: bool
    detail: str


@dataclass
class ForwardCheck:
    """A forward pass on a random batch: its input and output shapes and whether it was finite
    (or why it was skipped).

    Attributes:
        input: the random batch's shape.
        output: the features' shape.
        finite: whether every feature was finite.
        skipped: why no forward pass ran, or None.
    """

    input: list[int] | None = None
    output: list[int] | None = None
    finite: bool | None = None
    skipped: str | None = None


@dataclass
class HeadCheck:
    """A classification head: its size, flag, the model it was paired with and its logits.

    Attributes:
        classes: its outputs.
        input_dim: its inputs.
        normalize: its ``normalize`` flag.
        paired_with: the label of the model of the same name, if there is one.
        encoder_embed_dim: that encoder's feature size, when it loaded.
        logits: the logits' shape.
        note: why the head was checked alone, if it was.
    """

    classes: int | None = None
    input_dim: int | None = None
    normalize: bool | None = None
    paired_with: str | None = None
    encoder_embed_dim: int | None = None
    logits: list[int] | None = None
    note: str | None = None


@dataclass
class TaskVector:
    """A fine-tuned model minus ``_pretrained_``: tensors compared and the L2 norm of the
    difference over all float tensors (or why it was skipped).

    Attributes:
        against: the model subtracted (``_pretrained_``).
        tensors: the float tensors compared.
        l2_norm: the L2 norm of the difference over all of them.
        skipped: why no task vector was computed, or None.
    """

    against: str | None = None
    tensors: int | None = None
    l2_norm: float | None = None
    skipped: str | None = None


@dataclass
class EntryResult:
    """The outcome of one pool entry (a model or a head).

    ``stage`` names the step that failed (``file``, ``integrity``, ``load``, ``weights``,
    ``lock``, ``forward``, ``task vector``, ``pairing``, ``logits``). A model's ``paired_head`` is the label
    of its head (``classification_heads.<name>``); a head's details are in ``head``.

    Attributes:
        name: the entry's pool name.
        section: ``"models"`` or ``"classification_heads"``.
        form: the entry's configuration form (``path``, ``pickle_path``, ``state_dict_path``,
            ``hydra``, ``module``).
        file: the file's absolute path, for a file entry.
        container: the file's container.
        ok: whether every check passed.
        error: ``"<stage>: <message>"`` for a failure.
        error_type: the failure's exception class name.
        stage: the step that failed.
        integrity: the file's checksum check (verify's default; None with ``--no-integrity``).
        architecture: a model's architecture, inferred and configured.
        params: the module's parameter count.
        timings: seconds per step.
        forward: a model's forward pass.
        task_vector: a fine-tuned model's task vector against ``_pretrained_``.
        head: a head's details.
        paired_head: a model's head's label, when the pool has a head of the same name.
        rank: the torchrun rank that checked the entry (``pool.distributed``); None in one process.
        traceback: the failure's traceback (``--debug`` only; left out of the JSON when None).
    """

    name: str
    section: str  # "models" or "classification_heads"
    form: str
    file: str | None = None
    container: str | None = None
    ok: bool = True
    error: str | None = None
    error_type: str | None = None
    stage: str | None = None
    integrity: Integrity | None = None
    architecture: Architecture | None = None
    params: int | None = None
    timings: Timings = field(default_factory=Timings)
    forward: ForwardCheck | None = None
    task_vector: TaskVector | None = None
    head: HeadCheck | None = None
    paired_head: str | None = None
    rank: int | None = None
    traceback: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``<section>.<name>``, such as ``models.cars``."""
        return f"{self.section}.{self.name}"

    @property
    def is_model(self) -> bool:
        """Whether the entry is a model (else a classification head)."""
        return self.section == "models"

    def failed(self, exc: BaseException, *, stage: str, debug: bool = False) -> EntryResult:
        """Record ``exc`` as this entry's failure at ``stage``; returns self.

        An exception that is neither a `PoolError` nor an ``OSError`` is reported as unexpected
        (a bug), with its type.

        Args:
            exc: the exception the step raised.
            stage: the step (``load``, ``forward``, ...).
            debug: keep the traceback in ``traceback``.

        Returns:
            This entry, ``ok`` now False.
        """
        self.ok = False
        self.stage = stage
        self.error_type = type(exc).__name__
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if not isinstance(exc, (PoolError, OSError)):
            message = f"{type(exc).__name__}: {message} (unexpected; rerun with --debug for the traceback)"
        self.error = f"{stage}: {message}"
        if debug:
            self.traceback = "".join(traceback.format_exception(exc))
        return self

    def as_dict(self) -> dict[str, Any]:
        """The entry's JSON form (docs/cli.md, "verify --json").

        Returns:
            Every field, nested results as dicts, ``timings.total_s`` added, and ``traceback``
            left out when it is None.
        """
        out = asdict(self)
        out["timings"]["total_s"] = self.timings.total_s
        if out.get("traceback") is None:
            out.pop("traceback", None)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EntryResult:
        """Read an entry's JSON form back (`as_dict`); unknown keys are ignored.

        Args:
            data: one item of a report's ``entries``.

        Returns:
            The `EntryResult`, nested results rebuilt.

        Raises:
            TypeError: ``data`` lacks ``name``, ``section`` or ``form``.

        Example:
            >>> entry = EntryResult.from_dict({"name": "cars", "section": "models", "form": "path"})
            >>> entry.label, entry.ok, entry.timings.total_s
            ('models.cars', True, 0)
        """
        parts = {"integrity": Integrity, "architecture": Architecture, "forward": ForwardCheck,
                 "task_vector": TaskVector, "head": HeadCheck}
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for key, kind in parts.items():
            if isinstance(values.get(key), dict):
                values[key] = _build(kind, values[key])
        values["timings"] = _build(Timings, data.get("timings") or {})
        return cls(**values)


def _build(kind: type, data: dict[str, Any]) -> Any:
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in data.items() if k in names})


def versions() -> dict[str, str]:
    """The versions a report was made with: pool, torch, open_clip, safetensors, Python.

    Returns:
        Version strings by name: ``pool``, ``torch``, ``open_clip``, ``safetensors``, ``python``.

    Example:
        >>> sorted(versions())
        ['open_clip', 'pool', 'python', 'safetensors', 'torch']
    """
    # heavy: imported when a report is made, not when the CLI (which imports this module) starts
    import safetensors
    import torch
    from open_clip.version import __version__ as open_clip_version  # old releases lack open_clip.__version__

    return {"pool": __version__, "torch": torch.__version__, "open_clip": open_clip_version,
            "safetensors": safetensors.__version__, "python": platform.python_version()}


@dataclass
class VerifyReport:
    """Every entry's result plus what the run was (config, device, whether integrity was checked).

    Attributes:
        config: how the report names the config (its path, or ``embedded default``).
        device: where the entries were loaded and run.
        integrity_checked: whether each file's checksums were checked before loading.
        cache_dir: the conversion cache the loads used, or None when it was off.
        lock_file: the lock file the entries were compared with (``--locked``), or None.
        interrupted: True when the run was interrupted (Ctrl-C): the entries are those done.
        entries: one `EntryResult` per model and head, in the order they were checked.
        seconds: the run's duration.
        note: a remark on the run (what the embedded default is), or None.
        versions: the versions it ran with (`versions`); empty until filled in.
        allowed_globals: the globals the run accepted besides pool's allowlist (``--allow-global``,
            a config's ``allow_globals:``), which other readers of these files would call.
    """

    config: str
    device: str
    integrity_checked: bool
    entries: list[EntryResult]
    seconds: float = 0.0
    note: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    allowed_globals: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    lock_file: str | None = None
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        """Whether every entry passed and the run was not interrupted (True for a report without entries)."""
        return all(e.ok for e in self.entries) and not self.interrupted

    @property
    def failed(self) -> list[EntryResult]:
        """The entries that failed, in order."""
        return [e for e in self.entries if not e.ok]

    @property
    def models(self) -> list[EntryResult]:
        """The model entries, in order."""
        return [e for e in self.entries if e.is_model]

    @property
    def heads(self) -> list[EntryResult]:
        """The classification head entries, in order."""
        return [e for e in self.entries if not e.is_model]

    def as_dict(self) -> dict[str, Any]:
        """The documented JSON form (docs/cli.md, "verify --json").

        Returns:
            ``schema``, ``schema_version``, the run's fields, a ``summary`` (counts and failed
            labels) and each entry's `EntryResult.as_dict`; ``versions`` are this process's when
            the report has none.
        """
        models, heads = self.models, self.heads
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "tool": "openclip-pool verify",
            "config": self.config,
            "note": self.note,
            "ok": self.ok,
            "device": self.device,
            "integrity_checked": self.integrity_checked,
            "allowed_globals": list(self.allowed_globals),
            "cache_dir": self.cache_dir,
            "lock_file": self.lock_file,
            "interrupted": self.interrupted,
            "seconds": round(self.seconds, 4),
            "summary": {
                "models": len(models), "models_passed": sum(e.ok for e in models),
                "heads": len(heads), "heads_passed": sum(e.ok for e in heads),
                "failed": [e.label for e in self.failed],
            },
            "versions": self.versions or versions(),
            "entries": [e.as_dict() for e in self.entries],
        }

    def to_json(self) -> str:
        """The JSON form as text (what ``verify --json`` writes).

        Returns:
            `as_dict`, indented by two spaces; values JSON cannot hold are written as strings.
        """
        return json.dumps(self.as_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VerifyReport:
        """Read a report's JSON form back; refuses another schema or a newer version.

        Args:
            data: the parsed JSON (``json.load`` of what ``verify --json`` wrote).

        Returns:
            The `VerifyReport`, each entry an `EntryResult`.

        Raises:
            ValueError: ``data`` is no verify report (another ``schema``, or no integer
                ``schema_version``), or its ``schema_version`` is newer than `SCHEMA_VERSION`.
            KeyError: a required field (``config``, ``device``, ``integrity_checked``,
                ``entries``) is missing.

        Example:
            >>> from pool import VerifyReport
            >>> data = {"schema": "openclip-pool/verify-report", "schema_version": 2,
            ...         "config": "pool.yaml", "device": "cpu", "integrity_checked": False,
            ...         "entries": [{"name": "cars", "section": "models", "form": "path",
            ...                      "ok": False, "stage": "load", "error": "load: not found"}]}
            >>> report = VerifyReport.from_dict(data)
            >>> report.ok, [entry.label for entry in report.failed]
            (False, ['models.cars'])
            >>> VerifyReport.from_dict(json.loads(report.to_json())).failed[0].error
            'load: not found'
        """
        if data.get("schema") != SCHEMA or not isinstance(data.get("schema_version"), int):
            raise ValueError(f"not an openclip-pool verify report of a readable version (schema "
                             f"{data.get('schema')!r}); reports without a schema are version 1, written before "
                             "the report was typed: run verify again to get one.")
        if data["schema_version"] > SCHEMA_VERSION:
            raise ValueError(f"verify report schema_version {data['schema_version']} is newer than this "
                             f"pool reads ({SCHEMA_VERSION}); upgrade pool.")
        return cls(config=data["config"], device=data["device"], integrity_checked=data["integrity_checked"],
                   entries=[EntryResult.from_dict(e) for e in data["entries"]], seconds=data.get("seconds", 0.0),
                   note=data.get("note"), versions=dict(data.get("versions") or {}),
                   allowed_globals=list(data.get("allowed_globals") or []), cache_dir=data.get("cache_dir"),
                   lock_file=data.get("lock_file"), interrupted=bool(data.get("interrupted", False)))
