"""The `llcm` command: a thin layer that parses arguments and calls the library.

Each command group lives in its own module of this package and contributes its subcommands through a
`register(subparsers)` function; this file only lists those modules. The library never imports this
package (tests/test_layout.py checks it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llcm.errors import UserError

# Modules that add subcommands, in the order they appear in `llcm --help`.
COMMAND_MODULES = [
    "llcm.cli.data",
    "llcm.cli.train",
    "llcm.cli.encode",
    "llcm.cli.distill",
    "llcm.cli.generate",
    "llcm.cli.synthesize",
    "llcm.cli.evaluate",
    "llcm.cli.serve",
]

EPILOG = """\
typical workflow (the shipped default model; add --preset sd15 --base PATH for Stable Diffusion):
  llcm generate "axial brain MRI, T1-weighted"                      4 steps with the default model
  llcm data build my-images/ --out data/mine                        your folders -> a dataset
  llcm encode --data data/mine --model default --out lat/mine       its latents, computed once
  llcm finetune --model default --latents lat/mine --out runs/mine  adapt the model (LCF, about 12 min)
  llcm generate "a prompt of data/mine" --model runs/mine/model
  llcm evaluate --data data/mine --model mine=runs/mine/model --out runs/eval
  llcm synthesize --model runs/mine/model --per-class 500 --out synth/mine   a synthetic dataset
  llcm <command> --help                                             every command explains its options

Nothing is ever downloaded: models and data are local folders you pass by path (a model may also be a
Hugging Face id, org/name[@revision], that the local Hugging Face cache already holds).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llcm",
        description="Leapfrog Latent Consistency Models for medical images: build a dataset, "
        "train a teacher, distil a 1-4 step generator, generate and evaluate.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from llcm import __version__

    parser.add_argument("--version", action="version", version=f"llcm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def quiet_libraries() -> None:
    """No hub access, no library progress bars or advisory warnings: llcm prints its own progress."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers"):  # already imported (e.g. inside Python): tell them directly
        if name in sys.modules:
            log = importlib.import_module(f"{name}.utils.logging")
            log.set_verbosity_error()
            log.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        print(f"llcm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llcm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
