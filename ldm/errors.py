"""The kind of error a user can fix: bad input (a config value, a file, data), or a run that diverged. The
command-line programs report these as one line (ldm.cli_errors); everything else is a bug and keeps its
traceback. Errors of this kind are raised deep in the package (training, data, weight files): they subclass
UserError here, so that the reporting need not import the layers that raise them."""


class UserError(Exception):
    """An error the message of which tells the user what to change."""
