"""One exception type for bad user input: the CLI prints its message on one line and exits non-zero."""


class BebopError(ValueError):
    """A clear, specific complaint about a value the user gave (names the bad value)."""
