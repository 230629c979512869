"""The README's commands and configuration reference match the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from omegaconf import OmegaConf

from pool.cli import build_parser
from pool.entries import resolve_entry

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10: the extra is not checked
    tomllib = None

README = Path(__file__).parents[1] / "README.md"


def _yaml_blocks() -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)


def test_configuration_reference_resolves_to_the_documented_forms():
    config = OmegaConf.create(_yaml_blocks()[0])
    OmegaConf.resolve(config)
    forms = {name: resolve_entry(name, entry).form for name, entry in config.models.items()}
    assert forms == {"_pretrained_": "path", "cars": "pickle_path", "dtd": "state_dict_path",
                     "eurosat": "state_dict_path", "gtsrb": "hydra"}
    assert resolve_entry("eurosat", config.models.eurosat).options == {"quick_gelu": False}
    assert str(resolve_entry("cars", config.models.cars).path) == (
        ".cache/task_vectors_checkpoints/ViT-B-32/Cars/finetuned.pt")
    heads = {name: resolve_entry(name, entry, "classification_heads").form
             for name, entry in config.classification_heads.items()}
    assert heads == {"cars": "path", "dtd": "pickle_path", "gtsrb": "hydra"}


def _commands(script: str) -> list[list[str]]:
    """The commands a shell snippet runs, as argument lists: comments and blank lines dropped,
    ``&&`` chains split, a leading ``python3 -m venv``/``.`` environment set-up kept as is."""
    out = []
    for line in script.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            out.append(words[:cut])
            words = words[cut + 1:]
    return out


def _without_quiet(command: list[str]) -> list[str]:
    return [w for w in command if w != "-q"] if command[:1] in (["pip"], ["pytest"]) else command


def test_readme_opens_with_the_install_and_test_commands():
    """The README's first block installs with the test extra, runs ``verify`` on the embedded
    default and runs the tests; the extra brings what the tests need, the CLI parses that
    ``verify``, and CI runs exactly those commands, in that order, as live (uncommented) lines."""
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    readme = _commands(first_block)
    install, verify, tests = readme[-3:]
    assert install == ["pip", "install", "-e", ".[test]"], readme
    if tomllib is not None:
        extra = tomllib.loads((README.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        needed = {re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower() for req in extra["test"]}
        assert {"pytest", "hypothesis"} <= needed, extra["test"]
    assert verify[:1] == ["openclip-pool"]  # the console script: no pool/ folder in the working directory shadows it
    args = build_parser().parse_args(verify[1:])
    assert args.command == "verify" and args.config is None  # the embedded default, no file needed
    assert tests == ["pytest", "-q"]
    ci = [_without_quiet(c) for c in _commands((README.parent / ".ci" / "run").read_text())]
    positions = [ci.index(_without_quiet(c)) if _without_quiet(c) in ci else -1 for c in (install, verify, tests)]
    assert -1 not in positions and positions == sorted(positions), (positions, ci)


def test_python_example_runs(synth_tree, tmp_path, monkeypatch):
    """The README's Python example, run as written on a synthesized tree (pool.yaml, a "cars" entry)."""
    import shutil

    import numpy as np
    from PIL import Image

    block = re.search(r"## Using it from Python\n\n```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    shutil.copy(synth_tree.config, tmp_path / "pool.yaml")
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    pil_images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    namespace = {"pil_images": pil_images}
    exec(compile(block, "README.md", "exec"), namespace)  # our own documentation
    assert set(namespace["task_vectors"]) == set(namespace["pool"].model_names)
    assert namespace["logits"].shape == (3, namespace["head"].out_features)
