"""The command line, generated from :class:`~models.training.config.TrainConfig`'s fields.

Every field becomes an option ``--field-name`` (or its ``flag``) in its section of
``--help``, with its help text, choices and default.  A switch that is off by default is a
plain flag (``--compile``); one that is on by default is turned off by its ``--no-...`` flag.
Exit status: 0 done (also when stopped by --stop-after-steps), 1 the training diverged
(NaN/inf loss), 2 impossible settings, unreadable data or an unusable checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .checkpoint import CheckpointError
from .config import GENERAL, ConfigError, TrainConfig, flag_of
from .datasets import DataError

PROG = "python -m models.train"
DESCRIPTION = "Train a model on an MNIST-family data set (see docs/training.md)."


def _value_type(hint):
    """int for ``int``, ``int | None`` and ``list[int]``."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    hints = typing.get_type_hints(TrainConfig)
    sections: dict = {GENERAL: parser}
    for f in dataclasses.fields(TrainConfig):
        m = f.metadata
        if m["group"] not in sections:
            sections[m["group"]] = parser.add_argument_group(m["group"])
        add = sections[m["group"]].add_argument
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = m["help"].replace("%", "%%")
        if isinstance(default, bool):     # a switch: only its flag, no value
            add(flag_of(f), dest=f.name, help=help_text,
                action="store_false" if default else "store_true")
            continue
        shown = m["default_text"] or (" ".join(map(str, default)) if isinstance(default, list)
                                      else default)
        kw = dict(dest=f.name, default=default, help=f"{help_text} (default: {shown})",
                  type=m["parse"] or _value_type(hints[f.name]))
        if isinstance(default, list):
            kw["nargs"] = "+"
        if m["choices"]:
            kw["choices"] = m["choices"]
        elif m["parse"] is not None:
            kw["metavar"] = "{0,1}"
        add(flag_of(f), **kw)
    return parser


def parse_args(argv=None) -> TrainConfig:
    return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None) -> int:
    from .runs import run_all
    from .trainer import TrainingDiverged

    cfg = parse_args(argv)
    try:
        run_all(cfg)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"models.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingDiverged as e:
        print(f"models.train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0
