"""Errors a user can fix. The CLI prints them on one line and exits with code 2 (or the error's `exit_code`);
anything else is a bug."""


class UserError(Exception):
    """Bad input: a missing file, an invalid recipe, a record that does not parse. The message says what to do."""
