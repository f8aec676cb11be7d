"""Subcommands of the `balancerd` CLI; each module exposes register(parser)."""


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""
