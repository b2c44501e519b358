"""The errors a user can cause, which the command line reports in one line (exit status 2).

Kept apart from the modules that raise them so that the command line can name them without
importing torch.
"""
import difflib


def did_you_mean(name: str, known) -> str:
    """' (did you mean X?)' for the closest of `known` to a mistyped `name`, or ''."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class ModelFileError(RuntimeError):
    """A model path is missing, malformed or unsafe; the message says which and why."""


class DataMissing(RuntimeError):
    """A data set's files are not installed; the message names the install step."""


# ValueError (a bad option, model or data) and OSError (a path the system refuses) are the others
USER_ERRORS = (ValueError, OSError, ModelFileError, DataMissing)
