"""Errors a user can fix. The CLI prints them on one line and exits with code 2 (or the error's `exit_code`);
anything else is a bug."""


# EX_TEMPFAIL ("try again"): a command stopped by a signal after saving its work (train's checkpoint, eval's
# answers); the same command with --resume continues. One number for every command, so a scheduler's requeue
# rule (recipes/slurm/) holds for all of them.
STOPPED_EXIT = 75


class UserError(Exception):
    """Bad input: a missing file, an invalid recipe, a record that does not parse. The message says what to do."""
