"""The one exception type the command line turns into a single clear line and exit code 2."""

USER_ERROR_EXIT_CODE = 2  # bad input or configuration: fix it and run again (never worth a requeue)


class UserError(Exception):
    """Bad input that the user can fix: the message names the file or key and what to do."""
