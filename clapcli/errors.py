"""Exception types of the library. The CLI turns each into a one-line message and an exit code."""


class ClapError(Exception):
    """Base class: a problem the user can act on, reported without a traceback."""

    exit_code = 1


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
