"""nox sessions for pool: tests, the open_clip compatibility matrix, lint, golden files, benchmarks,
FusionBench.

Every session but ``fusion_bench`` runs on the interpreter that runs nox (``python=False``) and so
reuses the torch, torchvision and open_clip already installed there: nothing there downloads torch.
``fusion_bench`` builds its own Python 3.12 environment with uv (FusionBench 0.2.33 needs 3.12+).
Run nox from the project environment::

    .venv/bin/python -m nox -s tests compat lint        # or: . .venv/bin/activate && nox

``compat`` and ``golden`` install one open_clip_torch release with ``pip --no-deps --target`` into a
cache folder (``.nox/.cache/open_clip-<version>``, a ~1.5 MB wheel, downloaded once) and put it first
on ``PYTHONPATH``, so it shadows the environment's open_clip for that session only. Timings on a
2-core CPU box: see the README, "Supported versions and the nox matrix".
"""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path

import nox

nox.options.sessions = ["tests", "compat", "lint"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

ROOT = Path(__file__).parent
PYTHON = sys.executable  # the interpreter running nox: the one with torch installed

#: open_clip_torch releases the matrix proves: the oldest supported, a late 2.x, the newest 3.x.
OLDEST_OPEN_CLIP = "2.7.0"
OPEN_CLIP_VERSIONS = [OLDEST_OPEN_CLIP, "2.32.0", "3.3.0"]
#: What compat runs under each version: the tests that touch open_clip (goldens, modeling, the pool,
#: the plugin's fixtures, the CLI, whose reports name open_clip's version). The reader/fuzz/security
#: tests never import open_clip's model code.
COMPAT_TESTS = ["tests/test_golden.py", "tests/test_modelpool.py", "tests/test_smoke_reader.py", "tests/test_cli.py"]


def _open_clip_dir(session: nox.Session, version: str) -> Path:
    """A ``--target`` folder holding exactly ``open_clip_torch==version`` (no dependencies)."""
    target = Path(session.cache_dir) / f"open_clip-{version}"
    if not (target / "open_clip").is_dir():
        session.run(PYTHON, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    f"open_clip_torch=={version}", external=True)
    return target


def _interpreter(version: str) -> str:
    """A pyenv-installed ``python<version>`` when there is one (pyenv's shims answer only for the
    active version), else the bare version for nox to find on PATH."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = sorted(glob.glob(os.path.join(root, "versions", f"{version}.*", "bin", f"python{version}")))
    return found[-1] if found else version


def _env_with(path: Path) -> dict[str, str]:
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(path) + (os.pathsep + existing if existing else "")}


@nox.session(python=False)
def tests(session: nox.Session) -> None:
    """The README test command on the current stack (extra pytest arguments after --)."""
    session.run(PYTHON, "-m", "pytest", "-q", *session.posargs, external=True)


@nox.session(python=False)
@nox.parametrize("open_clip", OPEN_CLIP_VERSIONS)
def compat(session: nox.Session, open_clip: str) -> None:
    """The open_clip-facing tests under one open_clip_torch release (torch as installed)."""
    target = _open_clip_dir(session, open_clip)
    env = _env_with(target)
    session.run(PYTHON, "-c", "import open_clip, torch; from open_clip import version; "
                "print('open_clip', version.__version__, 'from', open_clip.__file__, '| torch', torch.__version__)",
                env=env, external=True)
    session.run(PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(session.posargs or COMPAT_TESTS),
                env=env, external=True)


@nox.session(python=False)
def lint(session: nox.Session) -> None:
    """ruff over the package, the tests and the benchmarks."""
    paths = [p for p in ("pool", "tests", "benchmarks", "noxfile.py") if (ROOT / p).exists()]
    session.run(PYTHON, "-m", "ruff", "check", *paths, external=True)


NONDETERMINISTIC = ("legacy", "pickle")


@nox.session(python=False)
def golden(session: nox.Session) -> None:
    """Regenerate the golden files with open_clip 2.0.2 and compare them with tests/data/golden.

    ``nox -s golden`` writes into a temporary folder and fails if a committed file differs from the
    regenerated one: by sha256 for the deterministic containers (zip, state dict, safetensors); for
    legacy and plain-pickle files, whose storage keys are object addresses, by globals and
    every other manifest field (``manifest.json`` itself carries a date). ``nox -s golden -- --write`` regenerates tests/data/golden in place.
    """
    import json

    target = _open_clip_dir(session, "2.0.2")
    env = _env_with(target)
    committed = ROOT / "tests" / "data" / "golden"
    out = committed if "--write" in session.posargs else Path(session.create_tmp()) / "golden"
    session.run(PYTHON, str(ROOT / "tests" / "golden" / "make_golden.py"), str(out), env=env, external=True)
    if out == committed:
        session.log(f"wrote {out}: review `git diff --stat {out.relative_to(ROOT)}` and commit")
        return
    sys.path.insert(0, str(ROOT / "tests" / "golden"))
    from manifest import load_manifest, verify_manifest

    problems = verify_manifest(committed)
    old = {e["name"]: e for e in load_manifest(committed)["files"]}
    new = {e["name"]: e for e in load_manifest(out)["files"]}
    if set(old) != set(new):
        problems.append(f"file lists differ: committed-only {sorted(set(old) - set(new))}, "
                        f"regenerated-only {sorted(set(new) - set(old))}")
    for name in sorted(set(old) & set(new)):
        a, b = old[name], new[name]
        if a.get("container") in NONDETERMINISTIC:
            # legacy storage keys (and the legacy blobs inside plain pickles) are object addresses (so
            # even the size varies): compare every other field; make_golden's self-check has already re-read the new
            # file and matched its tensors and features to expected_*.safetensors, whose sha256 must match
            a, b = ({k: v for k, v in e.items() if k not in ("sha256", "size")} for e in (a, b))
            if a != b:
                problems.append(f"{name}: regenerated entry differs: {sorted(k for k in a if a[k] != b.get(k))}")
        elif a["sha256"] != b["sha256"]:
            problems.append(f"{name}: regenerated sha256 {b['sha256'][:12]} != committed {a['sha256'][:12]}")
    if problems:
        session.error("golden files differ from a fresh open_clip 2.0.2 run:\n  " + "\n  ".join(problems)
                      + "\n(`nox -s golden -- --write` regenerates them)")
    session.log(json.dumps({"golden": "reproducible", "files": len(new)}))


@nox.session(python=False)
def benchmarks(session: nox.Session) -> None:
    """CPU benchmarks, each beside its baseline in the same run, then the results file and chart.

    ``nox -s benchmarks -- --benchmark-disable`` runs each benchmark once, as a test (what CI does).
    Architectures: ``POOL_BENCH_ARCHS=ViT-B-32,ViT-B-16,ViT-L-14`` (default ViT-B-32). Warm page
    cache only unless ``-- --cold`` (the benchmark's files) or ``-- --cold=drop_caches`` (the whole
    machine's page cache) is given. Needs the ``bench`` extra (pytest-benchmark, matplotlib).
    """
    quick = "--benchmark-disable" in session.posargs
    out = ROOT / ".benchmarks" / "run.json"
    args = [] if quick else [f"--benchmark-json={out}"]
    session.run(PYTHON, "-m", "pytest", "benchmarks", *args, *session.posargs, external=True)
    if not quick:
        session.run(PYTHON, "benchmarks/report.py", "--bench-json", str(out), external=True)


FUSION_BENCH_TESTS = ["tests/test_fusion_bench.py", "tests/test_pool_parity.py"]


@nox.session(python=_interpreter("3.12"), venv_backend="uv")
def fusion_bench(session: nox.Session) -> None:
    """FusionBench 0.2.33 on our pool, in its own Python 3.12 environment (uv; torch from the
    registry, cached by uv after the first run): a task tree written by open_clip 2.0.2 itself
    (tests/golden/make_task_tree.py: zip, legacy and plain-pickle containers), then SimpleAverage,
    TaskArithmetic and TIES through the Python API and ``fusion_bench method=task_arithmetic ...``
    through the CLI, each merge compared with one computed by hand (tests/test_fusion_bench.py)."""
    session.install("-e", ".[test,fusion-bench]")
    target = Path(session.cache_dir) / "open_clip-2.0.2-uv"
    if not (target / "open_clip").is_dir():
        session.install("--no-deps", "--target", str(target), "open_clip_torch==2.0.2")
    tree = Path(session.create_tmp()).absolute() / "task_tree_open_clip_2.0.2"
    session.run("python", "tests/golden/make_task_tree.py", str(tree), env=_env_with(target))
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *(session.posargs or FUSION_BENCH_TESTS),
                env={"POOL_FUSION_TREE": str(tree), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})


# -- the environment matrix (issue 12) ------------------------------------------------------------------
#: (cell id, Python, packages pinned beyond the project's own requirements). "newest" cells pin nothing:
#: uv resolves the newest torch, torchvision and open_clip the ranges allow; the "oldest" cell pins the
#: lower bounds pyproject claims.
MATRIX = [
    ("py3.10-newest", _interpreter("3.10"), []),
    ("py3.11-newest", _interpreter("3.11"), []),
    ("py3.12-newest", _interpreter("3.12"), []),
    ("py3.13-newest", _interpreter("3.13"), []),
    ("py3.10-oldest", _interpreter("3.10"),
     ["torch==2.4.1", "torchvision==0.19.1", f"open_clip_torch=={OLDEST_OPEN_CLIP}"]),
]
MATRIX_DIR = ROOT / ".nox-matrix"  # one JSON per cell; `nox -s matrix_report` turns them into docs/matrix.md
# Run every cell with `nox -t matrix`, then `nox -s matrix_report`.


def _matrix_cell(session: nox.Session, cell: str, pins: list[str]) -> None:
    """One cell of the environment matrix: its own environment (uv), the whole test suite, a JSON
    record (versions, counts, minutes) under .nox-matrix/. The environment is removed after the cell
    (uv hardlinks from its cache, so the next cell costs seconds, not gigabytes)."""
    import json
    import shutil
    import time
    import xml.etree.ElementTree as ET

    session.install("-e", ".[test]", *pins)
    versions = session.run("python", "-c", "import json, platform, torch, torchvision, open_clip.version as v; "
                           "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
                           "'torchvision': torchvision.__version__, 'open_clip': v.__version__}))",
                           silent=True).strip().splitlines()[-1]
    MATRIX_DIR.mkdir(exist_ok=True)
    junit = MATRIX_DIR / f"{cell}.xml"
    start = time.perf_counter()
    try:
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *session.posargs,
                    env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}, success_codes=[0, 1])
    finally:
        minutes = (time.perf_counter() - start) / 60
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        if junit.exists():
            suite = ET.parse(junit).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            total, failed = int(suite.get("tests", 0)), int(suite.get("failures", 0))
            errors, skipped = int(suite.get("errors", 0)), int(suite.get("skipped", 0))
            counts = {"passed": total - failed - errors - skipped, "failed": failed, "skipped": skipped,
                      "errors": errors}
        record = {"cell": cell, "pins": pins, **json.loads(versions), **counts, "minutes": round(minutes, 1)}
        (MATRIX_DIR / f"{cell}.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.rmtree(session.virtualenv.location, ignore_errors=True)


def _register_cell(cell: str, interpreter: str, pins: list[str]) -> None:
    def run_cell(session: nox.Session) -> None:
        _matrix_cell(session, cell, pins)

    run_cell.__doc__ = f"matrix cell {cell}: Python {interpreter.rsplit('python', 1)[-1]}, " + (
        ", ".join(pins) if pins else "the newest torch, torchvision and open_clip the ranges allow")
    nox.session(name=f"matrix-{cell}", python=interpreter, venv_backend="uv", tags=["matrix"])(run_cell)


for _cell, _interp, _pins in MATRIX:
    _register_cell(_cell, _interp, _pins)


@nox.session(python=False)
def matrix_report(session: nox.Session) -> None:
    """docs/matrix.md (a table) and docs/matrix.json from the cells' records in .nox-matrix/
    (``nox -t matrix`` writes them)."""
    import json

    records = [json.loads((MATRIX_DIR / f"{cell}.json").read_text()) for cell, _, _ in MATRIX
               if (MATRIX_DIR / f"{cell}.json").exists()]
    (ROOT / "docs" / "matrix.json").write_text(json.dumps(records, indent=1) + "\n")
    rows = ["| cell | Python | torch | torchvision | open_clip | passed | failed | errors | skipped | minutes |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows += [f"| {r['cell']} | {r['python']} | {r['torch']} | {r['torchvision']} | {r['open_clip']} | {r['passed']} | "
             f"{r['failed']} | {r['errors']} | {r['skipped']} | {r['minutes']} |" for r in records]
    missing = [cell for cell, _, _ in MATRIX if not (MATRIX_DIR / f"{cell}.json").exists()]
    text = ("# The environment matrix\n\nWritten by `nox -t matrix` (each cell: its own uv environment, the whole "
            "test suite) and `nox -s matrix_report`. \"newest\" cells take the newest releases the project's "
            "ranges allow; \"oldest\" pins the lower bounds pyproject.toml claims.\n\n" + "\n".join(rows) + "\n")
    if missing:
        text += f"\nNot run: {', '.join(missing)}.\n"
    (ROOT / "docs" / "matrix.md").write_text(text)
    session.log(f"wrote docs/matrix.md ({len(records)} cells)")
