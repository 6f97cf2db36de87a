"""Exception types of the library. The CLI turns each into a one-line message and an exit code.

Exit codes (see README "Exit codes"): 0 ok; 1 a runtime failure (`ClapError` and every subclass below
except the usage errors), also when some of the files given could not be processed; 2 a usage error
(`UsageError`: the command line asks for something that cannot work, caught before any real work);
130 interrupted.
"""


class ClapError(Exception):
    """Base class: a problem the user can act on, reported without a traceback."""

    exit_code = 1


class UsageError(ClapError):
    """The command line (or an API call's arguments) asks for something that cannot work: options that do not
    fit together, nothing to do, an unknown name. Raised before any model is loaded where possible."""

    exit_code = 2


class AudioDecodeError(ClapError):
    """A file could not be read as audio: the message is "PATH: reason"; `reason` alone says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class CheckpointError(ClapError):
    """A checkpoint could not be found, recognised or loaded strictly."""


class WeightsNotAvailable(CheckpointError):
    """The named weights are not cached and cannot be downloaded here."""


class IndexStoreError(ClapError):
    """An index is missing, locked, built with another model or otherwise unusable."""


class DataError(ClapError):
    """Training or evaluation data is unusable: a shard, a manifest, or one member of them.

    `source` (the shard or manifest) and `member` (the sample key or row), when given, lead the message:
    "SOURCE: MEMBER: reason"; `reason` alone says why.
    """

    def __init__(self, reason: str, source: str | None = None, member: str | None = None):
        where = [str(p) for p in (source, member) if p is not None]
        super().__init__(": ".join([*where, reason]))
        self.reason, self.source, self.member = reason, source, member


class TrainingError(ClapError):
    """A training run cannot go on: the loss diverged, memory ran out (with what to change), or the run
    directory holds another run."""
