"""Exceptions shared across the package."""


class UsageError(Exception):
    """Bad user input (flag, recipe, argument). The CLI prints it and exits with code 2."""
