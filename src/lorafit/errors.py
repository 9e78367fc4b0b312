"""The one exception lorafit raises for bad input: its message is a single line for the user."""


class LorafitError(Exception):
    """A user-facing error: the CLI prints `lorafit: error: <message>` and exits with status 2."""
