"""The one exception type for mistakes a user can fix: the CLI prints its message as one line."""


class ErnieError(Exception):
    """Bad input (file, tensor, option): the message names it and says what to do."""
