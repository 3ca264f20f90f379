"""Config: defaults < TOML < flags, and every mistake in a file is an actionable error."""

from pathlib import Path

import pytest

from paci.config import load_config

EXAMPLE = Path(__file__).parent.parent / "configs" / "paci-small.toml"


def test_config_precedence_defaults_toml_flags():
    """A TOML value beats the default; a flag beats the TOML value; unset flags change nothing."""
    assert load_config().optim.lr == 1.6e-2
    config = load_config(EXAMPLE, {"optim": {"lr": 5e-4}, "train": {"steps": None}})
    assert config.optim.lr == 5e-4 and config.train.steps == 400 and config.pipeline.accum == 8


@pytest.mark.parametrize("overrides, expected", [
    ({}, ("muon", 1.6e-2, "none")),  # the recommended PACI: Muon, no compensation
    ({"optim": {"optimizer": "adamw"}}, ("adamw", 2e-3, "predict-window")),
    ({"optim": {"optimizer": "adamw", "lr": 1e-3, "compensate": "none"}}, ("adamw", 1e-3, "none")),
    ({"optim": {"optimizer": "nadamw"}}, ("nadamw", 2e-3, "none")),
    ({"pipeline": {"schedule": "1f1b"}, "optim": {"optimizer": "adamw"}}, ("adamw", 2e-3, "none")),
    ({"pipeline": {"schedule": "zb-h1"}}, ("muon", 1.6e-2, "none")),
])
def test_defaults_follow_the_optimizer(overrides, expected):
    """The optimizer defaults to Muon; the rate to the optimizer's own best, the compensation to
    predict-window for PACI with AdamW and none otherwise; whatever is given wins."""
    optim = load_config(None, overrides).optim
    assert (optim.optimizer, optim.lr, optim.compensate) == expected


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


def test_every_config_field_is_a_flag_of_paci_train():
    """The command line is a complete face of the config: each field of each [section] has a
    `paci train` flag (checked by parsing one), so nothing is settable only in TOML."""
    import dataclasses

    from paci.cli import build_parser
    from paci.commands.train import _TRAIN_FLAGS
    from paci.config import RunConfig

    parser = build_parser()
    for section in dataclasses.fields(RunConfig):
        fields = {f.name for f in dataclasses.fields(section.type if isinstance(section.type, type)
                                                      else type(getattr(RunConfig(), section.name)))}
        assert fields == set(_TRAIN_FLAGS[section.name].values()), section.name
    args = parser.parse_args(["train", "--weight-decay", "0.05", "--min-lr-ratio", "0.2", "--dp", "2"])
    assert (args.weight_decay, args.min_lr_ratio, args.dp) == (0.05, 0.2, 2)
    for flags in _TRAIN_FLAGS.values():
        for dest in flags:
            assert hasattr(args, dest), dest
