"""The package's layout rules: the library never imports the CLI (or argparse), and the CLI reads its
defaults from the one torch-free place the library reads them from."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import llcm

PACKAGE = Path(llcm.__file__).parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_nothing_outside_cli_imports_cli_or_argparse():
    library = [p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts[:1]]
    assert len(library) > 20  # the walk found the library
    offenders = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p)
                                                     if n == "argparse" or n == "llcm.cli" or n.startswith("llcm.cli."))
                 for p in library}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_every_command_module_is_in_the_cli_package():
    from llcm.cli import COMMAND_MODULES

    assert all(m.startswith("llcm.cli.") for m in COMMAND_MODULES)
    assert not list(PACKAGE.glob("commands_*.py"))


def test_help_builds_without_torch_and_shows_the_preset_defaults(capsys):
    code = ("import sys; from llcm.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from llcm.cli import main
    from llcm.presets import training_defaults

    d = training_defaults(None, "finetune")
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"preset default: {d['steps']}" in text and f"default {d['lr']}" in text
