"""Sending an indexed file to the browser: which path may be read, and WAV for formats a browser cannot play.

The path always comes from the index row of an id the index holds, never from the request. The file must still
lie inside the indexed folders once every symlink is followed: a file replaced by a symlink to elsewhere (or a
folder swapped for one) since indexing is refused, so the server never reads outside what the user indexed.

Browsers play WAV, FLAC, MP3, Ogg (Vorbis, Opus) and M4A: those are sent as they are (Starlette's FileResponse
answers Range with 206, so the player can seek). AIFF, CAF, W64, AU, RF64 and the rest are decoded by soundfile
block by block and sent as 16-bit WAV as they decode, in the file's own rate and channels.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator

from starlette.responses import StreamingResponse

from ..errors import ClapError
from ..index.rows import FileRecord
from .reader import NotFound

BROWSER_TYPES = {"wav": "audio/wav", "wave": "audio/wav", "flac": "audio/flac", "mp3": "audio/mpeg",
                 "ogg": "audio/ogg", "oga": "audio/ogg", "opus": "audio/ogg", "m4a": "audio/mp4"}
BLOCK_FRAMES = 1 << 16


class Forbidden(ClapError):
    """A request for something the server must not read (a file now outside the indexed folders): HTTP 403."""


def within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def checked_path(record: FileRecord, roots: list[str]) -> str:
    """The record's path, when the file is there and, symlinks followed, inside an indexed folder."""
    path = record.path
    if not os.path.lexists(path):
        raise NotFound(f"file {record.id} is gone from disk (moved or deleted since it was indexed)")
    real = os.path.realpath(path)
    real_roots = [os.path.realpath(r) for r in roots] + list(roots)
    if not any(within(real, root) for root in real_roots):
        raise Forbidden(f"file {record.id} now leads outside the indexed folders (a symlink); not served")
    if not os.path.isfile(real):
        raise NotFound(f"file {record.id} is no longer a file")
    return path


def extension(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def browser_plays(path: str) -> bool:
    return extension(path) in BROWSER_TYPES


def media_type(path: str) -> str:
    return BROWSER_TYPES[extension(path)]


def wav_response(path: str) -> StreamingResponse:
    """The file decoded to 16-bit PCM WAV as it streams (its header first: the length is known up front)."""
    import soundfile as sf

    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise NotFound(f"cannot decode {os.path.basename(path)}: {exc}") from None
    size = f.frames * f.channels * 2
    header = wav_header(f.samplerate, f.channels, size)

    def body() -> Iterator[bytes]:
        with f:
            yield header
            sent = 0
            while sent < size:
                block = f.read(BLOCK_FRAMES, dtype="int16", always_2d=True)  # (n, C)
                if not len(block):
                    break
                data = block.astype("<i2", copy=False).tobytes()[: size - sent]
                sent += len(data)
                yield data
            if sent < size:  # a stream shorter than its header: keep the promised length
                yield bytes(size - sent)

    name = os.path.splitext(os.path.basename(path))[0] + ".wav"
    return StreamingResponse(body(), media_type="audio/wav",
                             headers={"content-length": str(len(header) + size),
                                      "content-disposition": f"inline; filename*=UTF-8''{_quote(name)}"})


def wav_header(sample_rate: int, channels: int, data_bytes: int) -> bytes:
    """A canonical 44-byte PCM WAV header for 16-bit samples."""
    block_align = channels * 2
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block_align,
                                    block_align, 16)
            + b"data" + struct.pack("<I", data_bytes))


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
