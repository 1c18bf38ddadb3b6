"""The one exception type whose message is meant for the user.

Library code raises `UserError` with a one-line explanation (what is wrong, which file/key/value, what was
expected). Entry points (`train.py`, `test.py`, `retrieve.py`) print that line and exit non-zero without a
traceback unless `--debug` is given.
"""
import difflib
import re
import reprlib

# torch's DataLoader re-raises an exception from a worker process as `type(text)`, where the text holds the
# worker's whole traceback; the user's one line is the last line of that traceback ("module.Type: message").
_WORKER_TRACEBACK = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\s*Original Traceback "
                               r"\(most recent call last\):.*\n[\w.]+: ([^\n]+)\s*$", re.S)


class UserError(Exception):
    """A problem with the user's input (file, option, data), explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        message = str(message)
        from_worker = _WORKER_TRACEBACK.match(message)
        super().__init__(" ".join((from_worker.group(1) if from_worker else message).split()))
        if from_worker:
            self.add_note(message)  # printed with the traceback only (--debug)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short_repr(value) -> str:
    """repr() of `value` bounded to about a line, for quoting a user's value in an error message.

    A value from a file can be arbitrarily large or deep (a YAML alias bomb expands to billions of elements when
    walked), so messages never quote it whole.
    """
    return _SHORT.repr(value)


def closest(name, names):
    """The entry of `names` closest to `name` (or equal to it up to case); None when none is close."""
    names = [str(n) for n in names]
    close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.5)
    if not close:
        close = [n for n in names if n.lower() == str(name).lower()]
    return close[0] if close else None


def did_you_mean(name, names, prefix: str = "") -> str:
    """'; did you mean 'x'?' for the entry of `names` closest to `name`, else '': the one suggestion every
    "unknown ..." message of the project ends with (options, flags, heads, losses, data sets)."""
    close = closest(name, names)
    return f"; did you mean '{prefix}{close}'?" if close is not None else ""
