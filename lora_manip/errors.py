"""Errors a user can fix. The CLI prints them on one line and exits with code 2; anything else is a bug."""


class UserError(Exception):
    """Bad input: a missing file, an invalid recipe, a record that does not parse. The message says what to do."""
