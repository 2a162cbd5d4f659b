"""The `llcm` command: a thin layer that parses arguments and calls the library.

Each stage lives in its own module and contributes its subcommands through a
`register(subparsers)` function; this file only lists those modules.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from llcm.errors import UserError

# Modules that add subcommands, in the order they appear in `llcm --help`.
COMMAND_MODULES = [
    "llcm.data.cli",
    "llcm.commands_train",
    "llcm.commands_vae",
    "llcm.commands_training",
    "llcm.commands_generate",
    "llcm.commands_evaluate",
    "llcm.commands_serve",
]

EPILOG = """\
typical workflow (tiny CPU scale shown; add --preset sd15 --base PATH for Stable Diffusion):
  llcm data mini --out data/mini                 build the embedded offline dataset
  llcm generate "axial brain MRI" --steps 4      few-step generation with a model
  llcm <command> --help                          every command explains its options

Nothing is ever downloaded: models and data are local folders you pass by path.
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
