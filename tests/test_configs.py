"""Every shipped recipe config loads, and its header is the command that runs it."""

from pathlib import Path

import pytest

from peftlab.config import load_config

CONFIGS = sorted((Path(__file__).parents[1] / "recipes" / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_names_its_command(path):
    cfg = load_config(str(path))
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# accelerate launch recipes/") and f"--config recipes/configs/{path.name}" in first_line
    recipe = first_line.split()[3]
    assert (Path(__file__).parents[1] / recipe).is_file()
    assert cfg.strategy
