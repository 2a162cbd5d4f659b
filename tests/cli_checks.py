"""What the CLI must answer to bad input, shared by the tests of every command."""

from __future__ import annotations


def one_error_line(capsys) -> str:
    """Exactly one stderr line, `llcm COMMAND: error: ...`, and no traceback; returns it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ": error: " in err[0] and "Traceback" not in err[0], err
    return err[0]
