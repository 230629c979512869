"""Where commands run from (issue 23, fixes 3, 4 and 7).

* fix 4: the tree ``synth`` writes verifies from any working directory (its config names absolute
  paths), not only from the folder synth ran in;
* fix 7: a missing entry file's message is short (no listing of the working directory's unrelated
  contents) and, when the relative path exists beside the pool config, says so and how to fix it;
* fix 3: a ``pool/`` folder in the working directory does not break the console script
  ``openclip-pool``; ``python -m pool`` works from a clean folder and, when such a folder shadows an
  editable install, exits 2 with one message naming the folder instead of an ImportError traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pool import CheckpointNotFoundError, read_checkpoint, synth
from pool.cli import main
from pool.notfound import missing_message, note_config_file

REPO = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = Path(sys.executable).parent / "openclip-pool"


def _env(**extra: str) -> dict[str, str]:
    """The environment of a child: this checkout's pool first (an editable install elsewhere would
    otherwise be imported by the console script)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


# -- fix 4: synth's config works from anywhere ---------------------------------------------------------
def test_synth_tree_verifies_from_the_tree_its_parent_and_an_unrelated_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "tree", "--tasks", "Cars,DTD"]) == 0
    config = OmegaConf.load(tmp_path / "tree" / "pool.yaml")
    assert all(Path(str(p)).is_absolute() for p in config.classification_heads.values())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, argument in ((tmp_path / "tree", "pool.yaml"), (tmp_path, "tree/pool.yaml"),
                          (elsewhere, str(tmp_path / "tree" / "pool.yaml"))):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        code = main(["verify", argument])
        out, err = capsys.readouterr()
        assert code == 0, (cwd, out, err)
        assert "all 7 entries passed" in out, out


def test_synth_writes_absolute_paths_for_a_relative_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tree = synth.write_tree("t", tasks=["Cars"])
    assert tree.root == tmp_path / "t" and tree.config == tmp_path / "t" / "pool.yaml"
    assert all(p.is_absolute() for p in tree.files.values())
    assert OmegaConf.load(tree.config).models._pretrained_ == str(tmp_path / "t" / "tiny" / "zeroshot.pt")


# -- fix 7: short not-found messages, with the config-folder hint --------------------------------------
def _relative_tree(tmp_path: Path) -> Path:
    """A tree whose config names its files relative to the config's own folder."""
    tree = synth.write_tree(tmp_path / "project" / "ckpts", tasks=["Cars", "DTD"])
    text = tree.config.read_text().replace(f"{tree.root}/", "")
    config = tree.root / "relative.yaml"
    config.write_text(text)
    return config


def test_missing_entries_from_another_folder_name_the_config_folder_and_list_nothing(tmp_path, monkeypatch,
                                                                                     capsys):
    config = _relative_tree(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("unrelated_a.txt", "unrelated_b.txt", "notes"):
        (other / name).write_text("x")
    monkeypatch.chdir(other)
    code = main(["verify", str(config)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "unrelated_a.txt" not in out + err  # the working directory's contents are not listed
    failed = [line for line in out.splitlines() if "checkpoint not found" in line]
    assert failed, out
    text = " ".join(out.split())
    assert f"exists relative to the folder of the pool config relative.yaml, {config.parent}" in text
    assert "run from that folder, or make the path absolute" in text
    # each entry's message is short: a few lines, not a listing (the temporary folder's own length,
    # which pytest's numbering and xdist's worker names vary, is not the message's)
    assert len(text.replace(str(tmp_path), "T")) < 400 * 7 + 2000, len(text)
    monkeypatch.chdir(config.parent)  # the fix the message gives works
    assert main(["verify", str(config)]) == 0, capsys.readouterr()


def test_a_missing_file_in_the_working_directory_lists_it_but_a_missing_subtree_does_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zeroshot.pt").write_bytes(b"x")
    (tmp_path / "README").write_text("x")
    typo = missing_message(Path("zeroshot.pth"))  # a misspelt name right here: the listing helps
    assert "zeroshot.pt" in typo and str(tmp_path) in typo
    deep = missing_message(Path("ckpts/ViT-B-32/Cars/finetuned.pt"))  # nothing of it exists here
    assert "README" not in deep and "zeroshot.pt" not in deep
    assert f"{tmp_path} has no ckpts." in deep and "working directory" in deep
    with pytest.raises(CheckpointNotFoundError) as info:
        read_checkpoint("ckpts/ViT-B-32/Cars/finetuned.pt")
    assert "README" not in str(info.value)


def test_the_config_hint_needs_the_file_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "a.pt").write_bytes(b"x")
    note_config_file(tmp_path / "cfg" / ".." / "cfg" / "pool.yaml")
    monkeypatch.chdir(tmp_path)
    assert f"pool config pool.yaml, {tmp_path / 'cfg'};" in missing_message(Path("a.pt"))
    assert "pool config" not in missing_message(Path("b.pt"))  # not beside the config either
    assert "pool config" not in missing_message(tmp_path / "a.pt")  # absolute paths get no hint


# -- fix 3: a pool/ folder in the working directory ----------------------------------------------------
@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.write_tree(tmp_path_factory.mktemp("tree"), tasks=["Cars"]).config


@pytest.mark.skipif(not CONSOLE_SCRIPT.is_file(), reason="the openclip-pool console script is not installed "
                                                          "beside this interpreter (pip install -e .)")
def test_console_script_works_beside_a_pool_folder(small_tree, tmp_path):
    (tmp_path / "pool").mkdir()  # an empty folder named like the package: a namespace package for -m
    proc = subprocess.run([str(CONSOLE_SCRIPT), "verify", str(small_tree)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 5 entries passed" in proc.stdout


def test_python_m_pool_works_from_a_clean_folder(small_tree, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pool", "verify", str(small_tree)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all 5 entries passed" in proc.stdout


_EDITABLE_FINDER = textwrap.dedent("""
    # An editable install as setuptools makes one for this flat layout: a finder after PathFinder.
    import sys
    from importlib.machinery import PathFinder

    class EditableFinder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "pool" or name.startswith("pool."):
                parts = name.split(".")
                return PathFinder.find_spec(name, [str(__import__("pathlib").Path({repo!r}).joinpath(*parts[:-1]))])
            return None

    sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, EditableFinder)
""")


def test_python_m_pool_shadowed_by_a_pool_folder_says_so(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_EDITABLE_FINDER.format(repo=str(REPO)))
    work = tmp_path / "work"
    (work / "pool").mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-m", "pool", "--version"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "ImportError" not in proc.stderr
    assert str(work / "pool") in proc.stderr and "openclip-pool" in proc.stderr
    # the same finder from a clean folder: the package imports normally
    clean = subprocess.run([sys.executable, "-m", "pool", "--version"], cwd=site, env=env,
                           capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0 and "python -m pool" in clean.stdout, clean.stdout + clean.stderr
