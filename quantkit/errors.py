"""The one exception type the command line turns into ``error: ...`` and exit code 2."""


class QuantkitError(Exception):
    """Bad input or an unusable environment: the message is shown to the user as is."""
