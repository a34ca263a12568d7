"""One exception type for every user-facing mistake; the CLI prints it as one line."""


class MimiqError(Exception):
    """Bad input or missing resources: the message says what to pass instead."""
