"""The one exception type the command line turns into a single clear line and exit code 2, and the one
way an exception becomes part of such a line."""

USER_ERROR_EXIT_CODE = 2  # bad input or configuration: fix it and run again (never worth a requeue)


class UserError(Exception):
    """Bad input that the user can fix: the message names the file or key and what to do."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, stripped; its type's name when the message is empty."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
