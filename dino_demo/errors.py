"""Errors a person can act on: each message names the problem and the fix."""


class UserError(Exception):
    """An error whose message is meant for the user, shown in one line without a traceback."""


class HubUnreachable(UserError):
    """The Hugging Face Hub is needed but cannot be reached."""
