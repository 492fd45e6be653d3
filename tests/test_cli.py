"""Every CLI flag has a help text; flags with a fixed set of values have choices; required flags are
marked required (walks each module's argparse parser without running it)."""
from __future__ import annotations

import argparse
import importlib

import pytest

from nbcore.model import PRESETS
from nbcore.cli.train import _FLAG_HELP
from nbcore.train import TrainConfig

CLIS = ["nbcore.cli.shapes", "nbcore.cli.data", "nbcore.cli.train", "nbcore.cli.validate", "nbcore.cli.bench", "nbcore.runner",
        "nbcore.cli.encoders", "nbcore.cli.pretrained"]


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds: parse_args is intercepted before anything runs."""
    def capture(self, *a, **k):
        raise _Captured(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Captured) as e:
        importlib.import_module(module).main([])
    monkeypatch.undo()
    return e.value.parser


def walk(parser: argparse.ArgumentParser, path: str = ""):
    """(path, action) for every argument of the parser and of its sub-commands."""
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                yield f"{path}{choice.dest} (sub-command)", choice
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path}{name} ")
            continue
        yield path + "/".join(action.option_strings or [action.dest]), action


@pytest.mark.parametrize("module", CLIS)
def test_every_flag_has_help(module, monkeypatch):
    rows = list(walk(parser_of(module, monkeypatch)))
    assert len(rows) >= 2
    missing = [name for name, action in rows if not (action.help or "").strip()]
    assert not missing, f"{module}: no help for {missing}"
    # help says what the flag does, not only its default
    bare = [name for name, action in rows if action.help.strip().startswith("(default")]
    assert not bare, f"{module}: help is only a default for {bare}"


# flag -> its choices / flags that must be required, per CLI ("sub-command flag" for sub-commands)
CHOICES = {
    "nbcore.cli.shapes": {"make --preset": set(PRESETS)},
    "nbcore.cli.train": {"--preset": set(PRESETS), "--patch-pos-embed": {"none", "learned", "sincos"},
                     "--schedule": {"cosine", "constant"}, "--timestep-sampling": {"logit_normal", "uniform"},
                     "--warm-start-weights": {"model", "ema"}},
    "nbcore.cli.validate": {"--formula": {"independent", "nested"}, "--split": {"val", "train"}},
    "nbcore.cli.bench": {"--preset": {"auto", "tiny", "production"}, "--dtype": {"auto", "fp32", "bf16"}},
    "nbcore.runner": {"run --profile": {"smoke", "cpu", "cpu-coarse", "cpu-long", "gpu"}},
    "nbcore.cli.encoders": {"precompute --dtype": {"float32", "float16", "bfloat16"}},
}
REQUIRED = {
    "nbcore.cli.shapes": {"make --n"},
    "nbcore.cli.data": {"stats --out"},
    "nbcore.cli.train": {"--data"},
    "nbcore.cli.validate": {"--data"},
    "nbcore.runner": {"run --profile"},
    "nbcore.cli.encoders": {"precompute --dino", "precompute --t5", "precompute --vae"},
}


@pytest.mark.parametrize("module", CLIS)
def test_choices_and_required_flags(module, monkeypatch):
    flags = {name: a for name, a in walk(parser_of(module, monkeypatch)) if a.option_strings}
    for name, want in CHOICES.get(module, {}).items():
        key = next(k for k in flags if k == name or k.startswith(name + "/"))
        assert set(flags[key].choices or ()) == want, (module, name, flags[key].choices)
    required = {name for name, a in flags.items() if a.required}
    assert required == REQUIRED.get(module, set()), module


def test_train_help_covers_every_config_field():
    """The train CLI is built from TrainConfig: a new field needs a help line."""
    import dataclasses
    assert set(_FLAG_HELP) == {f.name for f in dataclasses.fields(TrainConfig)}
