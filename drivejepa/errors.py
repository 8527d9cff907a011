"""Errors that the command line reports as one clear line (exit code 2) instead of a traceback."""


class UserError(Exception):
    """A mistake in the user's input: a missing dataroot, a bad file, an unknown scene. Say which and why."""
