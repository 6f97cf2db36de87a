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
    """A file could not be read as audio: the message is "PATH: reason"; `reason` alone says why, `kind`
    whether the file is at fault (`DATA_FAILURE`) or the machine (`ENVIRONMENT_FAILURE`: see `failure_kind`)."""

    def __init__(self, path: str, reason: str, kind: str | None = None):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason
        self.kind = kind or DATA_FAILURE


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


def first_line(exc: BaseException) -> str:
    """The first non-blank line of `exc`'s message, stripped, for one-line error messages; the exception's type
    name when the message is empty (`str(exc).splitlines()[0]` raises IndexError there, hiding the real error)."""
    try:
        text = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not replace the error being reported
        text = ""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


# What a failure to embed a file says about the file: `clap index` records it with the error and tries an
# environmental failure again on every run, a data failure only once the file has changed.
DATA_FAILURE = "data"  # the file itself cannot be embedded (bad bytes, a decoder that rejects or crashes on it)
ENVIRONMENT_FAILURE = "environment"  # the machine failed, not the file: retried on every run
FAILURE_KINDS = (DATA_FAILURE, ENVIRONMENT_FAILURE)


def failure_kind(exc: BaseException) -> str:
    """`ENVIRONMENT_FAILURE` when `exc` (or an exception it was raised from) comes from the machine rather
    than the file's bytes: any OSError (no space in TMPDIR, EIO/ESTALE on a network share, a permission or a
    mount missing on this node), running out of memory (MemoryError, CUDA or CPU allocator out of memory);
    `DATA_FAILURE` otherwise. An OSError never describes a file's content: decoders report bad bytes with
    their own errors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (OSError, MemoryError)):
            return ENVIRONMENT_FAILURE
        if isinstance(exc, AudioDecodeError) and exc.kind == ENVIRONMENT_FAILURE:
            return ENVIRONMENT_FAILURE
        if isinstance(exc, RuntimeError) and _out_of_memory(str(exc)):
            return ENVIRONMENT_FAILURE
        exc = exc.__cause__
    return DATA_FAILURE


def _out_of_memory(message: str) -> bool:
    """torch's messages for an allocation that failed: CUDA and MPS "out of memory", the CPU allocator's
    "can't allocate memory"."""
    message = message.lower()
    return "out of memory" in message or "can't allocate memory" in message
