"""The one exception type the command line turns into a single clear line and exit code 2."""


class UserError(Exception):
    """Bad input that the user can fix: the message names the file or key and what to do."""
