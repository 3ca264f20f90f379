"""Config: defaults < TOML < flags, and every mistake in a file is an actionable error."""

from pathlib import Path

import pytest

from paci.config import load_config

EXAMPLE = Path(__file__).parent.parent / "configs" / "paci-small.toml"


def test_config_precedence_defaults_toml_flags():
    """A TOML value beats the default; a flag beats the TOML value; unset flags change nothing."""
    assert load_config().optim.lr == 2e-3
    config = load_config(EXAMPLE, {"optim": {"lr": 5e-4}, "train": {"steps": None}})
    assert config.optim.lr == 5e-4 and config.train.steps == 400 and config.pipeline.accum == 8


@pytest.mark.parametrize("text, fragment", [
    ("[modle]\npreset = 'tiny'\n", "unknown section [modle]"),
    ("[model]\npreest = 'tiny'\n", "unknown key 'preest' in [model]"),
    ("[model]\npreset = 'tiny'\n[", "not valid TOML"),
    ("[pipeline]\nstages = 0\n", "stages must be an integer >= 1"),
    ("[optim]\nlr = -1.0\n", "--lr must be > 0"),
    ("[pipeline]\nnproc = 2\nstages = 3\n", "--nproc 2 must equal --stages 3"),
])
def test_config_file_mistakes_are_actionable(tmp_path, text, fragment):
    """Unknown sections or keys, bad TOML and bad values raise ValueError naming the problem."""
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_config(path)


def test_missing_config_file():
    """--config pointing nowhere says so."""
    with pytest.raises(ValueError, match="no such file"):
        load_config("nowhere.toml")
