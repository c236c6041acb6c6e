"""Errors a person can act on: each message names the problem and the fix."""


class UserError(Exception):
    """An error whose message is meant for the user, shown in one line without a traceback."""


class HubUnreachable(UserError):
    """The Hugging Face Hub is needed but cannot be reached."""


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (libraries bury the cause under pages of detail),
    or its type's name when it has no message."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
