"""The one exception type for bad user input: the CLI prints its message as a single line and exits 2."""


class UserError(Exception):
    """Bad input (config, checkpoint, data file, URI): the message names the problem and what is allowed."""
