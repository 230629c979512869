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
