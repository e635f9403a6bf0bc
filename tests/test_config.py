"""Config loading: YAML + dotted overrides into typed dataclasses, one-line errors naming the key, the recipe CLI."""

import ast
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import peftlab.strategies
from peftlab.cli import field_docs, parse_recipe_args, run_cli
from peftlab.config import (DataConfig, ModelConfig, MultitaskConfig, RecipeConfig, TaskConfig, TrainConfig,
                            config_to_dict, load_config, save_config)
from peftlab.errors import PeftlabError

FAKE_STRATEGIES = ["full", "head", "lora"]


def _fake_validate_strategy_options(name, options=None):
    # Stands in for the registry's check: lora takes an int `r`, the others take nothing.
    if name not in FAKE_STRATEGIES:
        raise PeftlabError(f"unknown strategy {name!r}")
    allowed = {"r": int} if name == "lora" else {}
    for key, value in (options or {}).items():
        if key not in allowed or not isinstance(value, allowed[key]):
            raise PeftlabError(f"strategy {name!r} option {key}={value!r} is invalid")


@pytest.fixture(autouse=True)
def fake_strategy_registry(monkeypatch):
    """Pin the strategy registry so these tests check config.py, not the strategies being written beside it."""
    monkeypatch.setattr(peftlab.strategies, "list_strategies", lambda: list(FAKE_STRATEGIES), raising=False)
    monkeypatch.setattr(peftlab.strategies, "validate_strategy_options", _fake_validate_strategy_options, raising=False)


def _write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_no_file_and_no_overrides_gives_the_defaults():
    assert load_config(None, []) == RecipeConfig()


def test_yaml_then_overrides_with_yaml_values(tmp_path):
    path = _write(tmp_path, """
        strategy: lora
        strategy_options: {lora: {r: 4}}
        train:
          lr: 1e-3          # PyYAML alone reads this as the string "1e-3"
          epochs: 2
          max_steps: 50
        data:
    """)
    cfg = load_config(path, [
        "train.lr=2e-4", "strategy=full", "strategy_options.lora.r=16", "model.head_modules=[classifier, pooler]",
        "train.max_steps=null", "train.max_grad_norm=2", "train.trackers=[]", "overwrite=true",
    ])
    assert cfg.train.lr == 2e-4 and cfg.train.epochs == 2 and cfg.train.max_steps is None
    assert cfg.strategy == "full" and cfg.strategy_options == {"lora": {"r": 16}}
    assert cfg.model.head_modules == ["classifier", "pooler"]
    assert cfg.train.max_grad_norm == 2.0 and isinstance(cfg.train.max_grad_norm, float)  # int accepted for float
    assert cfg.train.trackers == [] and cfg.overwrite is True
    assert cfg.data == DataConfig()  # an empty `data:` section keeps its defaults
    assert load_config(path, []).train.lr == 1e-3


def test_later_override_wins_and_whole_sections_can_be_set():
    cfg = load_config(None, ["train.epochs=1", "train.epochs=5", "model={name: bert, num_hidden_layers: 2}"])
    assert cfg.train.epochs == 5
    assert cfg.model == ModelConfig(name="bert", num_hidden_layers=2)
    cfg = load_config(None, ["strategy_options={lora: {r: 2}}", "strategy_options.lora.r=8"])
    assert cfg.strategy_options == {"lora": {"r": 8}}


def test_string_fields_keep_the_typed_text():
    # YAML would read these as True, 2024 and a float; for a `str` field the user meant the text.
    cfg = load_config(None, ["data.name=yes", "output_dir=2024", "data.text_column=1.10", "resume_from=latest"])
    assert (cfg.data.name, cfg.output_dir, cfg.data.text_column, cfg.resume_from) == ("yes", "2024", "1.10", "latest")
    assert load_config(None, ["resume_from=null"]).resume_from is None
    assert load_config(None, ["data.name='quoted'"]).data.name == "quoted"


BAD_OVERRIDES = [
    # (override, key the message must name, fragment showing the bad value or what is allowed)
    ("train.lrr=1e-3", "train.lrr", "did you mean 'train.lr'"),
    ("lr=1e-3", "'lr'", "did you mean 'train.lr'"),
    ("train.epochs=three", "train.epochs", "expected int, got 'three'"),
    ("train.epochs=2.5", "train.epochs", "expected int, got 2.5"),
    ("train.batch_size=true", "train.batch_size", "expected int, got True"),
    ("overwrite=1", "overwrite", "expected bool"),
    ("train.optimizer=adam", "train.optimizer", "one of adamw, sgd, got 'adam'"),
    ("model.quantization=2bit", "model.quantization", "one of 8bit, 4bit or null, got '2bit'"),
    ("model.head_modules=classifier", "model.head_modules", "expected list of str or null"),
    ("train.trackers=[1]", "train.trackers[0]", "expected str, got 1"),
    ("data.name=null", "data.name", "expected str, got null"),
    ("train.lr", "train.lr", "expected key=value"),
    ("train.lr=", "train.lr=", "expected key=value"),
    ("=3", "=3", "expected key=value"),
    ("train..lr=1", "train..lr", "expected key=value"),
    ("train.lr=[1", "train.lr", "cannot parse '[1'"),
    ("train.epochs=0", "train.epochs", "must be > 0, got 0"),
    ("train.batch_size=-8", "train.batch_size", "must be > 0, got -8"),
    ("train.lr=0", "train.lr", "must be > 0, got 0.0"),
    ("train.cpu_threads=0", "train.cpu_threads", "must be > 0, got 0"),
    ("train.eval_every=-1", "train.eval_every", "must be >= 0"),
    ("train.head_lr=0", "train.head_lr", "must be > 0, got 0.0"),
    ("train.layer_decay=0", "train.layer_decay", "must be in (0, 1], got 0.0"),
    ("train.layer_decay=1.5", "train.layer_decay", "must be in (0, 1], got 1.5"),
    ("train.loraplus_ratio=0.5", "train.loraplus_ratio", "must be >= 1, got 0.5"),
    ("model.batchnorm=fixed", "model.batchnorm", "one of auto, train, frozen, got 'fixed'"),
    ("data.validation_fraction=1.0", "data.validation_fraction", "must be in [0, 1), got 1.0"),
    ("data.test_fraction=-0.1", "data.test_fraction", "must be in [0, 1), got -0.1"),
    ("model=bert", "model", "expected a mapping of model.* keys, got 'bert'"),
    ("strategy_options=[1]", "strategy_options", "expected mapping of str to mapping"),
    ("strategy=lorra", "strategy", "did you mean 'lora'"),
    ("strategy_options.lorra.r=8", "strategy_options.lorra", "choose one of: full, head, lora"),
    ("strategy_options.lora.r=abc", "strategy_options.lora", "r='abc'"),
]


@pytest.mark.parametrize("override, key, fragment", BAD_OVERRIDES, ids=[case[0] for case in BAD_OVERRIDES])
def test_bad_override_is_one_line_naming_the_key(override, key, fragment):
    with pytest.raises(PeftlabError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert "\n" not in message
    assert key in message and fragment in message


def test_fractions_that_leave_no_training_data_are_rejected():
    expected = r"data\.validation_fraction \+ data\.test_fraction must be < 1.*0\.6 \+ 0\.4"
    with pytest.raises(PeftlabError, match=expected):
        load_config(None, ["data.validation_fraction=0.6", "data.test_fraction=0.4"])


@pytest.mark.parametrize("text, fragment", [
    ("train: {epochs: 2, warmup: 0.1}\n", "unknown config key 'train.warmup'; did you mean 'train.warmup_ratio'"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("train: {epochs: [}\n", "is not valid YAML"),
    ("train: 3\n", "train: expected a mapping of train.* keys"),
])
def test_bad_yaml_file_is_one_line(tmp_path, text, fragment):
    with pytest.raises(PeftlabError) as info:
        load_config(_write(tmp_path, text), [])
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(PeftlabError, match="cannot read config file .*nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"), [])


def test_only_the_selected_strategy_options_are_validated():
    # `lora` options with a bad value are ignored while `full` is selected; their strategy name is still checked.
    cfg = load_config(None, ["strategy=full", "strategy_options.lora.r=abc"])
    assert cfg.strategy_options == {"lora": {"r": "abc"}}
    with pytest.raises(PeftlabError, match="strategy_options.lora: .*r='abc'"):
        load_config(None, ["strategy=lora", "strategy_options.lora.r=abc"])


def _peftlab_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("peftlab")}


def test_no_import_circle_between_config_and_strategies():
    # The value checks both use live below both, in peftlab.typed; the strategies never import the config.
    package = Path(__file__).parents[1] / "peftlab"
    assert _peftlab_imports(package / "typed.py") == {"peftlab.errors", "peftlab.errors.PeftlabError"}
    for path in (package / "strategies").glob("*.py"):
        assert not any(name.startswith("peftlab.config") for name in _peftlab_imports(path)), path.name
    assert "peftlab.strategies" in _peftlab_imports(package / "config.py")  # checked at load, no ImportError escape


def test_save_then_load_round_trips(tmp_path):
    overrides = ["train.lr=1e-5", "data.name=yes", "strategy_options.lora.r=4", "model.head_modules=[score]"]
    cfg = load_config(None, overrides)
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.read_text().startswith("# Resolved peftlab config")
    assert load_config(str(path), []) == cfg


def test_config_to_dict_is_nested_plain_data():
    data = config_to_dict(RecipeConfig())
    assert data["train"]["lr"] == TrainConfig().lr and data["model"]["name"] == ModelConfig().name
    assert data["strategy_options"] == {} and isinstance(data["train"]["trackers"], list)


def test_field_docs_reads_attribute_docstrings():
    docs = field_docs(TrainConfig)
    assert docs["max_steps"] == "Stop after this many optimizer steps (overrides epochs)."
    assert "momentum" in docs and "model" not in field_docs(RecipeConfig)


def test_parse_recipe_args(tmp_path):
    path = _write(tmp_path, "train: {epochs: 7}\n")
    cfg, debug = parse_recipe_args(["--config", path, "train.lr=1e-4", "--debug"])
    assert (cfg.train.epochs, cfg.train.lr, debug) == (7, 1e-4, True)
    cfg, debug = parse_recipe_args([f"--config={path}"])
    assert (cfg.train.epochs, debug) == (7, False)
    cfg, _ = parse_recipe_args(["strategy=head"], default_config=path)
    assert (cfg.train.epochs, cfg.strategy) == (7, "head")


@pytest.mark.parametrize("argv, fragment", [
    (["--lr=1e-3"], "unknown flag '--lr=1e-3'; the flags are --config PATH, --debug, --help"),
    (["-v"], "unknown flag '-v'"),
    (["--config"], "--config needs a path"),
    (["train.lr", "1e-3"], "malformed override 'train.lr'"),
])
def test_parse_recipe_args_rejects_bad_arguments(argv, fragment):
    with pytest.raises(PeftlabError) as info:
        parse_recipe_args(argv)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_help_lists_every_key_with_its_docstring(capsys):
    with pytest.raises(SystemExit) as info:
        parse_recipe_args(["train.lr=oops", "--help"])  # help wins over a bad override
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--config PATH" in out and "--debug" in out
    assert "  train.lr: float = 0.0005" in out
    assert "  model.quantization: one of 8bit, 4bit or null = null" in out
    for prefix, cls in [("model.", ModelConfig), ("data.", DataConfig), ("train.", TrainConfig),
                        ("multitask.", MultitaskConfig), ("multitask.tasks[i].", TaskConfig), ("", RecipeConfig)]:
        for f in dataclasses.fields(cls):
            if f.name not in ("model", "data", "train", "multitask"):  # sections show as their dotted keys
                assert f"  {prefix}{f.name}: " in out
        for doc in field_docs(cls).values():
            assert doc in out


def test_run_cli_calls_main_with_the_config():
    assert run_cli(lambda cfg: cfg.train.epochs, ["train.epochs=4"]) == 4


@pytest.mark.parametrize("argv, raised_in_main", [(["train.epochs=zero"], False), ([], True)])
def test_run_cli_prints_one_line_and_exits_2(capsys, argv, raised_in_main):
    def main(cfg):
        if raised_in_main:
            raise PeftlabError("dataset 'x' not found")

    with pytest.raises(SystemExit) as info:
        run_cli(main, argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert ("dataset 'x' not found" if raised_in_main else "train.epochs: expected int") in err


def test_run_cli_debug_reraises():
    with pytest.raises(PeftlabError, match="train.epochs"):
        run_cli(lambda cfg: None, ["--debug", "train.epochs=zero"])


def test_run_cli_in_a_process_shows_no_traceback():
    code = "from peftlab.cli import run_cli; run_cli(print, ['train.optimizer=adam'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).parents[1])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: train.optimizer: expected one of adamw, sgd, got 'adam' (str)"
    ]


def test_defaults_pass_the_real_strategy_registry(monkeypatch):
    monkeypatch.undo()  # this one checks the real registry beside config.py
    from peftlab.strategies import list_strategies

    assert RecipeConfig().strategy in list_strategies()
    assert load_config(None, []) == RecipeConfig()
