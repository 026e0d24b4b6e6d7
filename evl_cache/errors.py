"""One exception type for bad user input, so the CLI can print it as a single line and exit non-zero."""


class UserError(Exception):
    """Bad input from the user: the message names the thing, where it is, and how to fix it."""
