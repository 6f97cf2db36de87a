"""Decode audio files to the waveform the models expect: float32 mono at 48 kHz, int16-quantised.

Every format libsndfile reads (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...) at any sample rate, bit depth
and channel count goes through `load_audio`. Channels are averaged to mono, the result is resampled with
`torchaudio.functional.resample` at its default settings and then sent through the int16 round trip that
the original LAION-CLAP API applies (`int16_to_float32(float32_to_int16(x))`). Any failure to read a
file becomes an `AudioDecodeError` whose message is one line naming the file and the reason.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from ..errors import ENVIRONMENT_FAILURE, AudioDecodeError

logger = logging.getLogger("clapcli.audio")

# Frames decoded per block when reading a file (fewer when that would pass MAX_BLOCK_BYTES).
_BLOCK_FRAMES = 1 << 20
# Bytes of one decoded block, frames × channels float32: a read never holds more, whatever the header says (a
# 1024-channel 768 kHz header would make 4 s blocks 12.6 GB). 64 MB is 5.8 min of 48 kHz stereo per read.
MAX_BLOCK_BYTES = 64 << 20
# Bytes a whole-file decode (a training sample, `clap shards make`, Wav2CLIP, `embed_audio`) may produce, frames ×
# channels float32: more is a damaged header or a decompression bomb (1 MB of FLAC silence holds gigabytes).
# 2.8 GB is two hours of 48 kHz stereo. Streaming (`clap index`, `search`, `tag` with CLAP models) has no such cap.
MAX_DECODED_BYTES = 2 * 3600 * 48_000 * 2 * 4
# The frame count libsndfile reports for a stream that does not declare its length (a FLAC written to a pipe).
UNKNOWN_FRAMES = (1 << 63) - 1

# Compressed formats whose header frame count can be an estimate (no exact sample count in the stream).
_ESTIMATED_LENGTH_FORMATS = {"MP3", "MPEG"}

# Sample rates a file may have: no audio is stored below 1 kHz (and resampling it to 48 kHz would multiply it
# 48-fold or more), none above 768 kHz; a header that says otherwise is damaged.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000
# Elements of torchaudio's sinc kernel above which a rate is not resampled exactly (see `_resampling_rate`).
_MAX_RESAMPLE_KERNEL = 1 << 22


@dataclass
class AudioInfo:
    path: str  # the file as given
    sample_rate: int  # Hz, as stored in the file
    channels: int  # interleaved channels in the file
    frames: int  # samples per channel, as declared by the container
    duration: float  # seconds = frames / sample_rate
    format: str  # libsndfile major format name: "WAV", "FLAC", "OGG", "MP3", "AIFF", ...
    partial: str | None = None  # set by a decode that stopped early: why only part of the file was read


def bounded_block_frames(channels: int, frames: int, budget: int | None = None) -> int:
    """Frames per read: `frames`, fewer when frames × channels float32 would pass `budget` (MAX_BLOCK_BYTES);
    at least one."""
    budget = MAX_BLOCK_BYTES if budget is None else budget
    return max(1, min(int(frames), budget // (4 * max(1, int(channels)))))


def decoded_size_problem(frames: int, channels: int) -> str | None:
    """Why `frames` × `channels` float32 samples are too many to decode whole (MAX_DECODED_BYTES), else None."""
    size = 4 * int(frames) * int(channels)
    if size <= MAX_DECODED_BYTES:
        return None
    return (f"too large to decode whole: {frames} frames × {channels} channels are {size / 1e9:.1f} GB as float32, "
            f"over the {MAX_DECODED_BYTES / 1e9:.1f} GB limit (a damaged header, or a decompression bomb?)")


def out_of_memory(err: MemoryError) -> str:
    """The reason for a decode that ran out of memory."""
    detail = str(err).strip()
    return "out of memory while decoding" + (f" ({detail})" if detail else "")


def _fail(path, reason: str, kind: str | None = None) -> AudioDecodeError:
    reason = " ".join(str(reason).split())  # one line, whatever libsndfile said
    return AudioDecodeError(os.fspath(path), reason, kind)


def _check_file(path) -> None:
    """Reasons that need no decoder: a missing path, a directory, a 0-byte file. A path that vanished since
    it was listed (an unmounted share, a node without the mount) is the machine's failure, not the file's."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise _fail(p, "file not found", ENVIRONMENT_FAILURE)
    if os.path.isdir(p):
        raise _fail(p, "is a directory, not an audio file")
    if os.path.getsize(p) == 0:
        raise _fail(p, "empty file (0 bytes)")


def _raw_reason(err) -> str:
    return (getattr(err, "error_string", "") or str(err) or type(err).__name__).strip().rstrip(".")


def _libsndfile_reason(err) -> str:
    raw = _raw_reason(err)
    if "Format not recognised" in raw:
        return "not a recognised audio file (supported: WAV, FLAC, OGG, MP3, AIFF and other libsndfile formats)"
    if "System error" in raw:
        return "cannot be opened (system error: permissions or I/O)"
    return f"cannot be decoded ({raw})"


def _open(path):
    import soundfile as sf

    _check_file(path)
    try:
        # bytes on POSIX: soundfile encodes a str strictly, so a name that is not UTF-8 could not be opened
        return sf.SoundFile(os.fsencode(path) if os.name == "posix" else os.fspath(path))
    except sf.LibsndfileError as err:
        # libsndfile's "System error": the operating system refused the open (permissions, I/O), not the bytes
        kind = ENVIRONMENT_FAILURE if "System error" in _raw_reason(err) else None
        raise _fail(path, _libsndfile_reason(err), kind) from err
    except (RuntimeError, OSError, ValueError, TypeError) as err:
        raise _fail(path, f"cannot be opened ({err})") from err


def _info_of(path, f) -> AudioInfo:
    if f.samplerate <= 0 or f.channels <= 0:
        raise _fail(path, f"invalid header (sample rate {f.samplerate}, channels {f.channels})")
    if not MIN_SAMPLE_RATE <= f.samplerate <= MAX_SAMPLE_RATE:
        raise _fail(path, f"unsupported sample rate {f.samplerate} Hz (a damaged header? "
                          f"expected {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz)")
    if f.frames <= 0:
        raise _fail(path, "contains no audio frames")
    return AudioInfo(
        path=os.fspath(path),
        sample_rate=int(f.samplerate),
        channels=int(f.channels),
        frames=int(f.frames),
        duration=f.frames / f.samplerate,
        format=str(f.format),
    )


def probe(path) -> AudioInfo:
    """Header facts of an audio file, without decoding it; AudioDecodeError if it is not usable audio."""
    messages: list[str] = []
    with captured_stderr(messages):
        f = _open(path)
    _log_messages(path, messages)
    with f:
        return _info_of(path, f)


class MonoReader:
    """Mono float32 blocks of a file, decoded block by block; what cannot be decoded ends the stream early.

    `info` is read on construction (AudioDecodeError if the file is not usable audio). Iterating yields
    (n,) float32 blocks of at most `block_frames` frames, channels averaged. A stream that breaks off (a
    truncated FLAC, an MP3 cut mid-frame, a WAV or AIFF shorter than its header, an Ogg without its last
    page) yields what decodes and then sets `partial` to the reason; `decoded` counts the frames yielded.
    Messages the C decoders print on stderr meanwhile are kept in `messages` (see `captured_stderr`)."""

    def __init__(self, path, block_frames: int | None = None):
        self.path = path
        self.messages: list[str] = []
        self.partial: str | None = None
        self.decoded = 0
        try:
            with captured_stderr(self.messages):
                self._file = _open(path)
        except AudioDecodeError:
            _log_messages(path, self.messages)
            raise
        try:
            self.info = _info_of(path, self._file)
            self.block_frames = bounded_block_frames(self.info.channels, block_frames or _BLOCK_FRAMES)
            self._note = _container_truncation(self._file)
        except BaseException:
            self._file.close()
            _log_messages(path, self.messages)
            raise

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "MonoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _mono(self, block: np.ndarray) -> np.ndarray:  # (n, C) -> (n,)
        if self.info.channels == 1:
            return block[:, 0].copy()
        if self.info.channels == 2:  # numpy's mean of two is (a + b) / 2, bit for bit; this is ~10x faster
            out = np.add(block[:, 0], block[:, 1])
            out *= np.float32(0.5)
            return out
        return block.mean(axis=1, dtype=np.float32)

    def __iter__(self) -> Iterator[np.ndarray]:
        import soundfile as sf

        info, failure = self.info, None
        while True:
            try:
                with captured_stderr(self.messages):
                    block = self._file.read(self.block_frames, dtype="float32", always_2d=True)  # (n, C)
            except sf.LibsndfileError as err:
                failure = _raw_reason(err)
                break
            except RuntimeError as err:
                failure = str(err) or type(err).__name__
                break
            except MemoryError as err:  # not damage in the stream: the machine is short of memory
                _log_messages(self.path, self.messages)
                raise _fail(self.path, out_of_memory(err)) from err
            if len(block) == 0:
                break
            self.decoded += len(block)
            yield self._mono(block)
        if failure is not None:  # the failed read lost its whole block: salvage it in small reads
            yield from self._salvage()
        if self.decoded == 0:
            _log_messages(self.path, self.messages)
            raise _fail(self.path, "contains no audio frames" if failure is None else
                        f"truncated or corrupt stream: no frame decodes ({failure})")
        shortfall = info.frames - self.decoded
        tolerance = 0 if info.format not in _ESTIMATED_LENGTH_FORMATS else info.frames // 100
        if failure is not None:
            self.partial = (f"truncated or corrupt stream: decoded {self.decoded} of {info.frames} frames "
                            f"({failure})")
        elif shortfall > tolerance:
            self.partial = f"truncated stream: the header declares {info.frames} frames, {self.decoded} decoded"
        elif self._note:
            self.partial = self._note

    def _salvage(self) -> Iterator[np.ndarray]:
        """Recover the frames before the damage that a failed read lost (it returns nothing of what it
        decoded): bisect the failed block with fresh reads, so that what a broken stream yields does not
        depend on the block size. Reads of k frames from a good position succeed up to the damage."""
        import soundfile as sf

        lo, hi = self.decoded, self.decoded + self.block_frames  # reading up to lo works, up to hi failed
        while hi - lo > 1:
            mid = (lo + hi) // 2
            try:
                with captured_stderr(self.messages):
                    f = _open(self.path)
            except AudioDecodeError:
                return
            with f:
                try:
                    with captured_stderr(self.messages):
                        f.seek(lo)
                        block = f.read(mid - lo, dtype="float32", always_2d=True)
                except (sf.LibsndfileError, RuntimeError, MemoryError, ValueError):
                    hi = mid
                    continue
            if len(block) == 0:
                return
            self.decoded += len(block)
            lo = self.decoded
            yield self._mono(block)


def _container_truncation(f) -> str | None:
    """Truncation libsndfile notices in the container but does not report as an error: a WAV/AIFF data chunk
    shorter than its header says (libsndfile then plays what is there), an Ogg stream without its final page."""
    try:
        log = f.extra_info or ""
    except (RuntimeError, AttributeError):
        return None
    chunk = re.search(r"^(data|SSND)\s*:\s*(\d+) \(should be (\d+)\)", log, re.MULTILINE)
    if chunk:
        return f"truncated file: its {chunk.group(1)} chunk declares {chunk.group(2)} bytes, {chunk.group(3)} present"
    if "lacks an end-of-stream" in log:
        return "truncated stream: the last Ogg page lacks its end-of-stream mark"
    return None


def read_mono(path) -> tuple[np.ndarray, AudioInfo]:
    """Decode the whole file as float32, averaging channels block by block. -> ((T,) float32, info)

    A truncated stream gives what decodes, with `info.partial` saying why it is short. A file whose frames ×
    channels pass MAX_DECODED_BYTES (declared, or decoded when the header does not say) is an AudioDecodeError
    before it is decoded that far, as is running out of memory."""
    with MonoReader(path) as reader:
        info = reader.info
        if info.frames != UNKNOWN_FRAMES and (problem := decoded_size_problem(info.frames, info.channels)):
            raise _fail(path, problem)
        blocks = []
        try:
            for block in reader:
                blocks.append(block)
                if problem := decoded_size_problem(reader.decoded, info.channels):
                    raise _fail(path, problem)
            mono = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        except MemoryError as err:
            raise _fail(path, out_of_memory(err)) from err
        info.partial = reader.partial
        _log_messages(reader.path, reader.messages)
    return mono, info


def _log_messages(path, messages: list[str]) -> None:
    for message in messages:
        logger.debug("%s: %s", os.fspath(path), message)


@contextlib.contextmanager
def captured_stderr(messages: list[str]) -> Iterator[None]:
    """Redirect file descriptor 2 around C decoder calls; what they print is appended to `messages`.

    libsndfile's decoders (mpg123's "Xing stream size off by more than 1%", ...) write straight to fd 2,
    which would tear through a progress bar; callers send `messages` to the debug log instead."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        sink = tempfile.TemporaryFile()
    except BaseException:  # no space in TMPDIR, say: the caller reports it; the saved fd must not leak
        os.close(saved)
        raise
    with sink:
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if sink.tell():
                sink.seek(0)
                text = sink.read().decode("utf-8", "replace")
                messages.extend(line.strip() for line in text.splitlines() if line.strip())


def quantize_int16(x):
    """int16 round trip of the original CLAP API: clip to ±1, ×32767, truncate toward zero, ÷32767.

    Accepts a numpy array or a torch tensor and returns the same kind, float32. The product is formed in
    the input's float precision (float32 for decoded audio) and the truncating cast matches numpy's
    `astype(np.int16)` and torch's `.to(torch.int16)`, so values like 0.99999 map to 32766/32767.
    NaN becomes 0.
    """
    if isinstance(x, np.ndarray) or np.isscalar(x):
        a = np.asarray(x)
        if not np.issubdtype(a.dtype, np.floating):
            a = a.astype(np.float32)
        a = np.nan_to_num(a, nan=0.0)
        ints = (np.clip(a, -1.0, 1.0) * a.dtype.type(32767.0)).astype(np.int16)
        return (ints / 32767.0).astype(np.float32)
    import torch

    t = x if x.is_floating_point() else x.to(torch.float32)
    t = torch.nan_to_num(t, nan=0.0)
    ints = (t.clamp(-1.0, 1.0) * 32767.0).to(torch.int16)
    return (ints.to(torch.float64) / 32767.0).to(torch.float32)


def to_model_rate(samples: np.ndarray, sr: int, target_sr: int = 48_000, quantize: bool = True) -> np.ndarray:
    """(T,) or (T, C) samples at `sr` -> (T',) float32 mono at `target_sr`, int16-quantised if asked.

    Channels are averaged in float32; resampling is `torchaudio.functional.resample` with its defaults
    (sinc interpolation, Hann window, lowpass width 6, rolloff 0.99) and is skipped at equal rates.
    """
    x = np.asarray(samples)
    if x.ndim == 2:
        x = x.astype(np.float32, copy=False)
        x = x[:, 0].copy() if x.shape[1] == 1 else x.mean(axis=1, dtype=np.float32)
    elif x.ndim != 1:
        raise ValueError(f"expected samples of shape (T,) or (T, C), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    sr, target_sr = int(sr), int(target_sr)
    if sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {sr} -> {target_sr}")
    if sr != target_sr and len(x):
        import torch
        import torchaudio.functional as AF

        if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
            raise ValueError(f"unsupported sample rate {sr} Hz (expected {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz)")
        x = AF.resample(torch.from_numpy(x), _resampling_rate(sr, target_sr), target_sr).numpy()
    return quantize_int16(x) if quantize else x


def _resampling_rate(sr: int, target_sr: int) -> int:
    """The rate to resample from: `sr`, unless torchaudio's exact kernel for sr → target_sr would be huge.

    That kernel has (target/g) × (sr/g + 2·width) elements, g = gcd(sr, target_sr): 160 × 161 for 44.1 kHz →
    48 kHz, but gigabytes and minutes for a rate prime to the target (16001 Hz, as a damaged header may
    say), and 1 GB and 10 s for a short clip at 11127 Hz (an old Macintosh rate). Such a rate is resampled
    as the nearest multiple of 10 Hz (else 100 Hz, else 1 kHz) whose kernel is small: a change of pitch and
    length of a few hertz' worth (0.03% at 11127 Hz, 0.006% at 16001 Hz)."""
    rate = sr
    for step in (1, 10, 100, 1000):
        rate = max(step, round(sr / step) * step)
        g = math.gcd(rate, target_sr)
        orig, new = rate // g, target_sr // g
        width = math.ceil(6 * orig / (min(orig, new) * 0.99))  # torchaudio's default lowpass width and rolloff
        if new * (orig + 2 * width) <= _MAX_RESAMPLE_KERNEL:
            break
    return rate


def load_audio(path, sample_rate: int = 48_000, quantize: bool = True) -> np.ndarray:
    """Decode a file to (T,) float32 mono at `sample_rate` (int16-quantised by default)."""
    mono, info = read_mono(path)
    try:
        return to_model_rate(mono, info.sample_rate, sample_rate, quantize=quantize)
    except MemoryError as err:
        raise _fail(path, out_of_memory(err)) from err
