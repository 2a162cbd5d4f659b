"""`llcm train ...`: the one parent parser of every training subcommand (vae, teacher, ...).

Each stage module adds its own subcommand with ``train_subparsers(sub).add_parser(NAME, ...)``;
the ``train`` group is created once per top-level parser, whichever module asks first.
"""

from __future__ import annotations

import argparse

_ATTR = "_llcm_train_subparsers"

DESCRIPTION = """\
Train a model with llcm's one training loop (accelerate, checkpoints every N steps, --resume,
metrics.jsonl, a sample grid at the end). The final model goes to OUT/model.
"""


def train_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-subparsers of `llcm train`, created on the first call and the same object afterwards."""
    existing = getattr(sub, _ATTR, None)
    if existing is not None:
        return existing
    parser = sub.add_parser("train", help="train a model: vae, teacher, ...", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_subparsers(dest="train_command", metavar="WHAT")
    parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    setattr(sub, _ATTR, group)
    return group


add_train_group = train_subparsers


def register(sub: argparse._SubParsersAction) -> None:
    train_subparsers(sub)
