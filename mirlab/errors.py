"""UserError: a problem with what the user gave mirlab (a file, a folder, an option value), not a bug.

Readers and the library raise it with a message that names the input and says what to do, e.g.

    raise UserError(f"{path}: no text before the first @highlight line: fill the story in or remove the file")

``mirlab`` (the command) prints such a message on one line of stderr and exits with status 2; ``--debug``
shows the traceback instead. It subclasses ValueError, so ``except ValueError`` keeps catching it.
This module imports nothing: every wing may use it.
"""


class UserError(ValueError):
    """Bad input from the user; the message names the file or option and what to do about it."""
