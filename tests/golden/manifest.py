"""Check a golden directory against its ``manifest.json`` (stdlib only).

``manifest.json`` (written by ``make_golden.py``) is a JSON object; the fields this module relies on::

    {"format": "pool-golden-manifest/1",
     "files": [{"name": "enc_tiny-vit-quickgelu.zip.pt", "sha256": "<hex>", "size": 123456, ...}, ...],
     ...}

Every other field (command, versions, date, per-file kind/container/arch...) is descriptive.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST_NAME = "manifest.json"
# Files that may sit next to the goldens without being listed.
_IGNORED = {MANIFEST_NAME, "README.md", ".gitattributes", ".gitignore"}


def load_manifest(directory: str | os.PathLike) -> dict:
    with open(os.path.join(directory, MANIFEST_NAME), encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(directory: str | os.PathLike) -> list[str]:
    """Return a list of problems (empty when the directory matches its manifest).

    Reports: a missing or unreadable manifest, listed files that are missing, size or sha256
    mismatches, duplicate entries, and files present in the directory but not in the manifest.
    """
    directory = os.fspath(directory)
    problems: list[str] = []
    try:
        manifest = load_manifest(directory)
    except FileNotFoundError:
        return [f"{directory}: no {MANIFEST_NAME}"]
    except (OSError, ValueError) as e:
        return [f"{directory}/{MANIFEST_NAME}: unreadable ({e})"]
    entries = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list):
        return [f"{directory}/{MANIFEST_NAME}: no 'files' list"]

    listed: set[str] = set()
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or os.path.basename(name) != name:
            problems.append(f"manifest entry {i}: bad or missing name {name!r}")
            continue
        if name in listed:
            problems.append(f"{name}: listed twice in the manifest")
            continue
        listed.add(name)
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: missing")
            continue
        size = os.path.getsize(path)
        if "size" in entry and entry["size"] != size:
            problems.append(f"{name}: size {size}, manifest says {entry['size']}")
        want = entry.get("sha256")
        if not want:
            problems.append(f"{name}: no sha256 in the manifest")
        else:
            got = sha256_file(path)
            if got != want:
                problems.append(f"{name}: sha256 {got}, manifest says {want}")

    for name in sorted(os.listdir(directory)):
        if name in _IGNORED or name in listed:
            continue
        if os.path.isdir(os.path.join(directory, name)):
            if name != "__pycache__":
                problems.append(f"{name}/: directory not in the manifest")
            continue
        problems.append(f"{name}: not in the manifest")
    return problems


if __name__ == "__main__":  # python tests/golden/manifest.py [DIR]
    import sys

    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "data", "golden")
    found = verify_manifest(d)
    print("\n".join(found) if found else f"ok: {d}")
    sys.exit(1 if found else 0)
