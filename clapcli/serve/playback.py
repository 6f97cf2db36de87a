"""Sending an indexed file to the browser: which path may be read, and WAV for formats a browser cannot play.

The path always comes from the index row of an id the index holds, never from the request. The file must still
lie inside the indexed folders once every symlink is followed: a file replaced by a symlink to elsewhere (or a
folder swapped for one) since indexing is refused, so the server never reads outside what the user indexed.

Browsers play WAV, FLAC, MP3, Ogg (Vorbis, Opus) and M4A: those are sent as they are (Starlette's FileResponse
answers Range with 206, so the player can seek). AIFF, CAF, W64, AU, RF64 and the rest are decoded by soundfile
block by block and sent as 16-bit WAV as they decode, in the file's own rate and channels; a Range request is
answered from the frame that holds its first byte, so the player seeks in those too.
"""

from __future__ import annotations

import os
import struct
from typing import Iterator

from starlette.responses import StreamingResponse

from ..errors import ClapError
from ..index.rows import FileRecord
from .reader import BROWSER_TYPES, NotFound

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


def wav_response(path: str, range_header: str | None = None) -> StreamingResponse:
    """The file decoded to 16-bit PCM WAV as it streams (its header first: the length is known up front). A
    `Range: bytes=a-b` request is answered 206 with those bytes, decoding from the frame that holds byte a,
    so the player can seek in a long AIFF as in any file it plays itself."""
    import soundfile as sf

    try:
        f = sf.SoundFile(path)
    except (sf.LibsndfileError, RuntimeError, OSError) as exc:
        raise NotFound(f"cannot decode {os.path.basename(path)}: {exc}") from None
    size = f.frames * f.channels * 2
    header = wav_header(f.samplerate, f.channels, size)
    total = len(header) + size
    wanted = byte_range(range_header, total)
    if wanted is None and range_header is not None:
        f.close()
        return StreamingResponse(iter(()), status_code=416, headers={"content-range": f"bytes */{total}"})
    first, last = wanted or (0, total - 1)

    def body() -> Iterator[bytes]:
        with f:
            if first < len(header):
                yield header[first : last + 1]
            start = max(first, len(header)) - len(header)  # into the PCM data
            end = last + 1 - len(header)
            if end <= start:
                return
            align = 2 * f.channels
            f.seek(start // align)
            skip, at = start % align, start - start % align
            while at < end:
                block = f.read(min(BLOCK_FRAMES, -(-(end - at) // align)), dtype="int16", always_2d=True)  # (n, C)
                data = block.astype("<i2", copy=False).tobytes() if len(block) else bytes(end - at)  # short stream
                data = data[skip : end - at]
                at += skip + len(data)
                skip = 0
                yield data

    name = os.path.splitext(os.path.basename(path))[0] + ".wav"
    headers = {"content-length": str(last - first + 1), "accept-ranges": "bytes",
               "content-disposition": f"inline; filename*=UTF-8''{_quote(name)}"}
    if wanted is not None:
        headers["content-range"] = f"bytes {first}-{last}/{total}"
    return StreamingResponse(body(), status_code=206 if wanted else 200, media_type="audio/wav", headers=headers)


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `bytes=a-b`, `bytes=a-` or `bytes=-n` range within `total` bytes; None for
    no header or one that cannot be met (several ranges are answered as the first)."""
    if not header or not header.startswith("bytes="):
        return None
    spec = header[len("bytes="):].split(",")[0].strip()
    low, _, high = spec.partition("-")
    try:
        if not low:
            first, last = max(0, total - int(high)), total - 1
        else:
            first, last = int(low), min(int(high), total - 1) if high else total - 1
    except ValueError:
        return None
    return (first, last) if 0 <= first <= last else None


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
