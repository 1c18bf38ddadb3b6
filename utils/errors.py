"""The one exception type whose message is meant for the user.

Library code raises `UserError` with a one-line explanation (what is wrong, which file/key/value, what was
expected). Entry points (`train.py`, `test.py`, `retrieve.py`) print that line and exit non-zero without a
traceback unless `--debug` is given.
"""


class UserError(Exception):
    """A problem with the user's input (file, option, data), explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
