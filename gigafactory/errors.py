"""The one exception type the CLI turns into a one-line message and a non-zero exit (no traceback)."""


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, flag). The message names what is wrong and the fix."""
