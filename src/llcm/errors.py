"""Errors that the CLI reports as one clear line (no traceback)."""


class UserError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
