"""The one base class of errors a user can fix by changing an option, a file or a command.

The experiment CLI prints such an error as one line (`error: <message>`) and exits with
status 2; anything else is a bug and keeps its traceback. Messages name the culprit: the
option as typed (`--distill.tau=0`), the file and row, or the folder.
"""


class UserError(Exception):
    """A bad option, bad input data, a missing prerequisite or a conflicting work directory."""
