"""The README's commands and configuration reference match the code."""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from pool.entries import resolve_entry

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


def test_readme_opens_with_the_install_and_test_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1).strip().splitlines()
    assert first_block[0].endswith('pip install -e ".[test]" && python -m pool verify')
    assert first_block[1] == "pytest -q"
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]"' in ci and "python -m pool verify" in ci and "pytest -q" in ci


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
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    assert set(namespace["task_vectors"]) == set(namespace["pool"].model_names)
    assert namespace["logits"].shape == (3, namespace["head"].out_features)
