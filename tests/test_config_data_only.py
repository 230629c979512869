"""Configs from outside (issue 20, item 5): the data-only mode, bounded YAML, and no environment
value in any report.

* data-only (``from_config(instantiate=False)``, ``verify --no-instantiate``,
  ``pytest --openclip-pool-no-instantiate``): Hydra keys at any depth and every resolver call are
  refused before anything runs; plain ``${a.b}`` references still work.
* both modes: an alias bomb, an oversized or too deeply nested file is a `ConfigError`, quickly;
  a ``${oc.env:...}`` value never shows in the text, stderr, JSON, JUnit or pytest output.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import run_isolated
from omegaconf import OmegaConf

from pool import ConfigError, OpenCLIPVisionModelPool, synth
from pool.cli import main
from pool.configsafety import MAX_CONFIG_BYTES, MAX_CONFIG_DEPTH, Redactor, env_secrets
from pool.pytest_verify import PoolEntryItem  # noqa: F401 - imported before any in-process pytester run
from pool.verify import prepare_pool

pytest_plugins = ["pytester"]

SECRET_MARK = "s3cr3t"  # part of the environment value: it must appear in no output


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny pickled encoder (torch zip), loadable in every mode."""
    path = tmp_path_factory.mktemp("data_only") / "zeroshot.pt"
    synth.save_module(synth.make_original_encoder(), path, "zip")
    return path


def write_yaml(path: Path, config: dict) -> Path:
    OmegaConf.save(OmegaConf.create(config), path)
    return path


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- Hydra keys: refused at any depth in the data-only mode ----------------------------------------------
HYDRA_CONFIGS = {
    "models.cars._target_": {"models": {"cars": {"_target_": "pool.ImageEncoder.load", "path": "x.pt"}}},
    "classification_heads.cars._target_": {"models": {"a": "a.pt"},
                                           "classification_heads": {"cars": {"_target_": "os.getcwd"}}},
    "test_datasets.dtd._target_": {"models": {"a": "a.pt"},
                                   "test_datasets": {"dtd": {"_target_": "datasets.load_from_disk"}}},
    "_target_": {"_target_": "pool.OpenCLIPVisionModelPool", "models": {"a": "a.pt"}},
    "extra.deep[1].inner._target_": {"models": {"a": "a.pt"},
                                     "extra": {"deep": [1, {"inner": {"_target_": "os.system"}}]}},
    "models.cars._partial_": {"models": {"cars": {"_partial_": True, "pickle_path": "x.pt"}}},
    "models.cars.path._args_": {"models": {"cars": {"pickle_path": "x.pt", "path": {"_args_": ["rm"]}}}},
}


@pytest.mark.parametrize("key_path", list(HYDRA_CONFIGS))
def test_hydra_keys_are_refused_in_python_with_their_key_path(tmp_path, key_path):
    config = write_yaml(tmp_path / "pool.yaml", HYDRA_CONFIGS[key_path])
    with pytest.raises(ConfigError) as info:
        OpenCLIPVisionModelPool.from_config(config, instantiate=False)
    message = str(info.value)
    assert f": {key_path}: " in message and str(config) in message
    assert "--no-instantiate" in message and "trust" in message
    OpenCLIPVisionModelPool.from_config(HYDRA_CONFIGS[key_path])  # the default mode still reads it


def test_a_mapping_and_a_dictconfig_are_checked_too():
    config = HYDRA_CONFIGS["extra.deep[1].inner._target_"]
    with pytest.raises(ConfigError, match=r"extra\.deep\[1\]\.inner\._target_"):
        OpenCLIPVisionModelPool.from_config(config, instantiate=False)
    with pytest.raises(ConfigError, match=r"models\.cars\._target_"):
        OpenCLIPVisionModelPool.from_config(OmegaConf.create(HYDRA_CONFIGS["models.cars._target_"]),
                                            instantiate=False)


def test_an_override_cannot_bring_a_target_in():
    with pytest.raises(ConfigError, match=r"models\.cars\._target_"):
        OpenCLIPVisionModelPool.from_config({"models": {"a": "a.pt"}}, overrides=["models.cars._target_=os.getcwd"],
                                            instantiate=False)


def test_from_yaml_checks_the_whole_file_in_the_data_only_mode(tmp_path):
    config = write_yaml(tmp_path / "fb.yaml", {"modelpool": {"models": {"a": "${..root}/a.pt"}},
                                               "root": "${oc.env:HOME}", "method": {"_target_": "os.getcwd"}})
    with pytest.raises(ConfigError, match=r"root: '\$\{oc.env:HOME\}' calls the resolver 'oc.env'"):
        OpenCLIPVisionModelPool.from_yaml(config, instantiate=False)


def test_a_hydra_config_name_is_refused_in_the_data_only_mode():
    with pytest.raises(ConfigError, match="never a Hydra config name"):
        OpenCLIPVisionModelPool.from_config("modelpool/some_pool", instantiate=False)


def test_the_cli_refuses_a_target_with_exit_2(tmp_path, capsys):
    config = write_yaml(tmp_path / "pool.yaml", HYDRA_CONFIGS["extra.deep[1].inner._target_"])
    code, out, err = cli(capsys, "verify", "--no-instantiate", config)
    assert code == 2, err
    assert "extra.deep[1].inner._target_" in err and "--no-instantiate" in err and "error:" in err
    assert "openclip-pool verify" not in out  # refused before any entry is checked


def test_the_pytest_option_refuses_a_target(pytester: pytest.Pytester, tmp_path, encoder_file):
    # in-process: pool.pytest_verify is imported above and encoder_file has imported what writing a
    # checkpoint imports (torch registers some modules' operators once per process, so pytester's
    # module snapshot must not drop them); the run that loads weights is a subprocess, below
    config = write_yaml(tmp_path / "pool.yaml", HYDRA_CONFIGS["models.cars._target_"])
    refused = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--openclip-pool-verify", str(config),
                                           "--openclip-pool-no-instantiate", "--collect-only", "-q")
    assert refused.ret == pytest.ExitCode.USAGE_ERROR
    assert "models.cars._target_" in refused.stderr.str() and "--no-instantiate" in refused.stderr.str()
    trusted = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--openclip-pool-verify", str(config),
                                           "--collect-only", "-q")
    assert trusted.ret == pytest.ExitCode.OK and "models.cars" in trusted.stdout.str()


def test_the_pytest_ini_value_turns_the_mode_on(pytester: pytest.Pytester, tmp_path, encoder_file):
    config = write_yaml(tmp_path / "pool.yaml", {"models": {"a": "${oc.env:HOME}/a.pt"}})
    pytester.makeini(f"[pytest]\nopenclip_pool_verify = {config}\nopenclip_pool_no_instantiate = true\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR and "oc.env" in result.stderr.str()


# -- a _target_ that would write a file: never run in the data-only mode ---------------------------------
def marker_config(tmp_path: Path, marker: Path) -> Path:
    """A model entry that Hydra would turn into ``open(marker, "w")``: running it writes the file."""
    return write_yaml(tmp_path / "pool.yaml",
                      {"models": {"evil": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}}})


def test_a_target_that_writes_a_file_never_runs_in_the_data_only_mode(tmp_path, capsys):
    marker = tmp_path / "marker"
    config = marker_config(tmp_path, marker)
    with pytest.raises(ConfigError):
        OpenCLIPVisionModelPool.from_config(config, instantiate=False)
    assert cli(capsys, "verify", "--no-instantiate", config)[0] == 2
    with pytest.raises(ConfigError):
        prepare_pool(config, instantiate=False)
    assert not marker.exists()
    cli(capsys, "verify", config)  # the default mode trusts the config: Hydra runs it
    assert marker.exists()


def test_a_data_only_pool_runs_no_hydra_entry_added_later(encoder_file):
    pool = OpenCLIPVisionModelPool.from_config({"models": {"a": str(encoder_file)}}, instantiate=False)
    assert pool.instantiate is False
    with pytest.raises(ConfigError, match="data-only mode"):
        pool.load_model({"_target_": "pool.ImageEncoder.load", "path": str(encoder_file)})


# -- resolvers: refused in the data-only mode, plain references kept -------------------------------------
@pytest.mark.parametrize("value", ["${oc.env:HOME}/a.pt", "${oc.env:'HOME',/tmp}/a.pt", "${oc.decode:'[1]'}",
                                   "${root.${oc.env:HOME}}", "${pool_test_custom:1}", "a/${oc.create:{}}"])
def test_resolvers_are_refused_in_the_data_only_mode(value):
    config = {"root": {"x": "/ckpt"}, "models": {"a": {"pickle_path": value}}}
    with pytest.raises(ConfigError, match=r"models\.a\.pickle_path: .* calls the resolver") as info:
        OpenCLIPVisionModelPool.from_config(config, instantiate=False)
    assert "--no-instantiate" in str(info.value)


def test_plain_interpolation_still_works_in_the_data_only_mode(encoder_file):
    config = {"root": str(encoder_file.parent), "name": encoder_file.name,
              "models": {"_pretrained_": "${root}/${name}", "cars": {"pickle_path": "${...root}/${...name}"}}}
    pool = OpenCLIPVisionModelPool.from_config(config, instantiate=False)
    assert pool.entry("_pretrained_").path == encoder_file and pool.entry("cars").path == encoder_file
    assert pool.load_model("cars").embed_dim == pool.load_pretrained_model().embed_dim


@pytest.mark.parametrize("extra", [{"literal": "\\${oc.env:HOME}"},
                                   {"d": "$", "joined": "${d}{oc.env:HOME}"}])
def test_text_that_resolves_into_a_resolver_call_is_refused(extra):
    """OmegaConf un-escapes \\${ and joins pieces; left in a DictConfig the result would be resolved
    on its next access and read the environment."""
    with pytest.raises(ConfigError, match="reads as another interpolation"):
        OpenCLIPVisionModelPool.from_config({"models": {"a": "a.pt"}, **extra}, instantiate=False)


def test_default_mode_hydra_target_still_works(encoder_file):
    pool = OpenCLIPVisionModelPool.from_config(
        {"models": {"h": {"_target_": "pool.ImageEncoder.load", "path": str(encoder_file)}}})
    assert pool.entry("h").form == "hydra" and pool.load_model("h").embed_dim > 0


# -- bounded YAML in both modes ----------------------------------------------------------------------
BOMB = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}' if i else '1'] * 9)}]\n" for i in range(9)) \
    + "models: {a: a.pt}\n"


def _load(config: str, instantiate: bool) -> str:
    try:
        OpenCLIPVisionModelPool.from_config(config, instantiate=instantiate)
    except ConfigError as exc:
        return str(exc)
    return "loaded"


@pytest.mark.parametrize("instantiate", [True, False])
def test_an_alias_bomb_is_a_quick_config_error(tmp_path, instantiate):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    assert config.stat().st_size < 1000  # 9 ** 9 lists once expanded
    report = run_isolated(_load, str(config), instantiate, timeout=120.0)  # a hang guard, not a speed bound
    assert report.kind == "returned", str(report)
    assert "aliases" in report.value and "billion laughs" in report.value and str(config) in report.value
    assert report.peak_extra < 200 << 20, str(report)  # bounded before expansion: memory says so, not time


@pytest.mark.parametrize("text, expected", [
    ("models: {a: a.pt}\n# " + "x" * MAX_CONFIG_BYTES + "\n", "larger than"),
    ("models: {a: a.pt}\nx: " + "[" * (MAX_CONFIG_DEPTH + 5) + "]" * (MAX_CONFIG_DEPTH + 5) + "\n", "nests deeper"),
    ("models: {a: a.pt}\nx: " + "[" * 2000 + "]" * 2000 + "\n", "nest"),
    ("models: {a: a.pt}\nx: &x [*x, *x]\n", "nests deeper"),
    ("models: {a: a.pt}\nx: [" + "1, " * 30_000 + "1]\n", "YAML nodes"),
    ("\"models: {a: a.pt}\"\n", "the top level is a str"),
])
def test_oversized_or_deep_configs_are_config_errors(tmp_path, capsys, text, expected):
    config = tmp_path / "big.yaml"
    config.write_text(text)
    for instantiate in (True, False):
        with pytest.raises(ConfigError, match=expected):
            OpenCLIPVisionModelPool.from_config(config, instantiate=instantiate)
    assert cli(capsys, "verify", config)[0] == 2


def test_from_yaml_is_bounded_too(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(BOMB)
    with pytest.raises(ConfigError, match="aliases"):
        OpenCLIPVisionModelPool.from_yaml(config)


# -- environment values never reported (default mode) ------------------------------------------------
@pytest.fixture()
def secret_pool(tmp_path: Path, encoder_file: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A pool whose files live under ``${oc.env:POOL_TEST_ROOT}`` (a folder named with SECRET_MARK):
    one entry passes, one is missing. Returns (config, secret folder)."""
    secret = tmp_path / f"{SECRET_MARK}-folder"
    secret.mkdir()
    (secret / "zeroshot.pt").write_bytes(encoder_file.read_bytes())
    monkeypatch.setenv("POOL_TEST_ROOT", str(secret))
    config = write_yaml(tmp_path / "pool.yaml", {
        "root": "${oc.env:POOL_TEST_ROOT}",
        "models": {"_pretrained_": "${root}/zeroshot.pt", "cars": {"pickle_path": "${...root}/missing.pt"}},
        "classification_heads": {"cars": "${oc.env:POOL_TEST_ROOT}/head_cars.pt"}})
    return config, secret


def test_verify_prints_no_environment_value(secret_pool, tmp_path, capsys):
    config, secret = secret_pool
    report = tmp_path / "report.json"
    code, out, err = cli(capsys, "verify", config, "--json", report)
    assert code == 1
    text = report.read_text()
    for output in (out, err, text):
        assert SECRET_MARK not in output
    assert "${oc.env:POOL_TEST_ROOT}/missing.pt" in err  # the streamed FAIL line shows the config text
    assert "${oc.env:POOL_TEST_ROOT}/missing.pt" in out
    entries = {e["name"]: e for e in json.loads(text)["entries"] if e["section"] == "models"}
    assert entries["_pretrained_"]["ok"] and entries["_pretrained_"]["file"] == "${oc.env:POOL_TEST_ROOT}/zeroshot.pt"
    code, out, _ = cli(capsys, "verify", config, "--json", "-", "--debug")  # tracebacks in the JSON too
    assert '"traceback"' in out and SECRET_MARK not in out and "${oc.env:POOL_TEST_ROOT}" in out


def test_pytest_items_print_no_environment_value(secret_pool, pytester: pytest.Pytester, tmp_path):
    config, _ = secret_pool
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--openclip-pool-verify", str(config),
                                          f"--junitxml={junit}", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str() + result.stderr.str()
    assert "${oc.env:POOL_TEST_ROOT}/missing.pt" in output
    assert SECRET_MARK not in output and SECRET_MARK not in junit.read_text()
    assert {c.get("name") for c in ET.parse(junit).getroot().iter("testcase")} >= {"models._pretrained_", "models.cars"}


def test_config_errors_print_no_environment_value(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("POOL_TEST_ROOT", f"/srv/{SECRET_MARK}")
    config = write_yaml(tmp_path / "pool.yaml", {"models": {"a": {"weird": "${oc.env:POOL_TEST_ROOT}/x"}}})
    code, out, err = cli(capsys, "verify", config)
    assert code == 2 and "${oc.env:POOL_TEST_ROOT}/x" in err and SECRET_MARK not in out + err


def test_redactor_matches_the_forms_a_path_takes(monkeypatch):
    monkeypatch.setenv("POOL_TEST_ROOT", f"~/{SECRET_MARK}//dir")
    secrets = env_secrets({"a": "${oc.env:POOL_TEST_ROOT}/x", "b": "${oc.decode:${oc.env:'POOL_TEST_ROOT'}}"})
    assert secrets == {f"~/{SECRET_MARK}//dir": "${oc.env:POOL_TEST_ROOT}"}
    redact = Redactor(secrets)
    expanded = str(Path(f"~/{SECRET_MARK}//dir").expanduser())
    for text in (f"~/{SECRET_MARK}//dir/x", f"{expanded}/x.pt", f"~/{SECRET_MARK}/dir"):
        assert SECRET_MARK not in redact(text) and "${oc.env:POOL_TEST_ROOT}" in redact(text)
    assert Redactor({"ab": "${oc.env:X}"})("a tab") == "a tab"  # too short to be a secret: left alone
