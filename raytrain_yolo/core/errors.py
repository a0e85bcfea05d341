"""The one exception type that reaches users as a single line."""


class UserError(Exception):
    """A mistake the user can fix: the message names the problem and the fix. Exit status 2, no traceback."""
