"""Long files in bounded memory: decode, resample and cut model inputs block by block.

`iter_pieces` turns files into a stream of `Piece`s, each small whatever the file's length:

- a file of at most one clip (10 s at 48 kHz) is one "clip" piece holding its whole waveform;
- a longer file gives a "window" piece per full-coverage 10 s window (`window_starts`: 0, 10 s, …, the last
  aligned to the end), cut from a rolling buffer as soon as it is complete, when the caller needs windows;
  a fused model also gets one "fusion" piece, the (4, 1001, 64) feature stack of the whole file;
- "progress" pieces report decoded audio between windows, and one "end" piece closes every file with its
  duration, source format and, for a stream that broke off, the `partial` reason; a file that cannot be
  decoded at all gives one "error" piece instead.

Every step equals the whole-file path within float rounding: `StreamResampler` runs torchaudio's sinc kernel
over blocks with their neighbours as context, the int16 round trip and the channel mean act per sample,
`StreamingMel` computes STFT frames from a rolling buffer with the reflect padding only at the true file ends,
and `FusionCollector` keeps only the mel rows the fusion stack reads: the three 1001-frame crops and the
two source rows of each of the 1001 rows of the bilinear (align_corners=False) squeeze, interpolated as
torch's `F.interpolate` does. Crops and squeeze depend on the file's length, taken from its header; when
the stream ends elsewhere (an MP3 whose header estimates, a truncated file) the mel is computed again in a
second pass that knows the length.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import DATA_FAILURE, AudioDecodeError, ClapError, failure_kind
from .decode import MonoReader, _resampling_rate, bounded_block_frames, quantize_int16
from .features import fusion_crop_starts
from .frontend import MelFrontEnd

BLOCK_SECONDS = 4.0  # source audio decoded per block, fewer frames when that passes decode.MAX_BLOCK_BYTES


@dataclass
class StreamOptions:
    sample_rate: int = 48_000  # model rate, Hz
    quantize: bool = True  # int16 round trip after resampling
    clip_samples: int = 480_000  # one model clip (10 s)
    windows: bool = True  # cut full-coverage windows from files longer than one clip
    fusion: bool = False  # build the fused model's (4, frames, mels) stack for files longer than one clip
    frontend: object = None  # FrontEndConfig of the model; needed with `fusion`
    block_seconds: float | None = None  # source seconds decoded per block (None: BLOCK_SECONDS)


@dataclass
class Piece:
    index: int  # position of the file in the input
    path: str
    kind: str  # "clip", "window", "fusion", "progress", "end" or "error"
    seconds: float = 0.0  # audio decoded (at the model rate) since the file's previous piece
    expected_seconds: float = 0.0  # the file's length by its header
    samples: np.ndarray | None = None  # (n,) float32: the whole short file ("clip") or a window
    start: int = 0  # first sample of a window
    features: torch.Tensor | None = None  # (4, frames, mels) float32 for "fusion"
    longer: bool = False  # "fusion": is_longer (False when the mel is exactly one clip long)
    samples_total: int = 0  # "end": samples at the model rate
    sample_rate: int | None = None  # "end": of the source
    channels: int | None = None  # "end": of the source
    partial: str | None = None  # "end": why only part of the file could be decoded
    error: str | None = None  # "error": why nothing could be decoded (without the path)
    error_kind: str | None = None  # "error": DATA_FAILURE or ENVIRONMENT_FAILURE (errors.failure_kind)
    messages: list[str] = field(default_factory=list)  # "end"/"error": what the C decoders printed


@dataclass
class FusionStack:
    """A fused model's ready input for one long file."""

    features: torch.Tensor  # (4, frames, mels) float32: [squeeze, front, middle, back]
    longer: bool  # is_longer: False when the mel is exactly one chunk


# ---- resampling ----------------------------------------------------------------------------------------

def resampled_length(length: int, orig_sr: int, new_sr: int) -> int:
    """Samples `torchaudio.functional.resample` returns for `length` input samples."""
    if orig_sr == new_sr:
        return length
    g = math.gcd(orig_sr, new_sr)
    return int(math.ceil(new_sr // g * length / (orig_sr // g)))


class StreamResampler:
    """`torchaudio.functional.resample` (default settings) of a signal fed in blocks of any size.

    The sinc filter's output block j (new/g samples) reads input [j·o − w, j·o + o + w) with o = orig/g and
    w the filter's half width; blocks are computed once all their input is present, the zero padding of
    the whole-signal version applied only before the first and after the last sample."""

    def __init__(self, orig_sr: int, new_sr: int):
        self.orig_sr, self.new_sr = int(orig_sr), int(new_sr)
        self.length = 0  # input samples fed
        self.emitted = 0  # output samples returned
        if self.orig_sr == self.new_sr:
            return
        import torchaudio

        g = math.gcd(self.orig_sr, self.new_sr)
        self.o, self.n = self.orig_sr // g, self.new_sr // g
        # dtype float32: the kernel torchaudio.functional.resample builds for a float32 waveform
        rs = torchaudio.transforms.Resample(self.orig_sr, self.new_sr, dtype=torch.float32)
        self.kernel, self.width = rs.kernel, rs.width  # (n, 1, 2w + o)
        self.buf = np.zeros(0, np.float32)  # input samples from buf_start on
        self.buf_start = 0
        self.next_block = 0

    def feed(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        self.length += len(x)
        if self.orig_sr == self.new_sr:
            self.emitted += len(x)
            return x
        self.buf = np.concatenate([self.buf, x]) if len(self.buf) else x
        end = (self.length - self.width) // self.o  # blocks before this one have all their input
        return self._blocks(end, final=False)

    def finish(self) -> np.ndarray:
        if self.orig_sr == self.new_sr:
            return np.zeros(0, np.float32)
        out = self._blocks(self.length // self.o + 1, final=True)
        target = resampled_length(self.length, self.orig_sr, self.new_sr)
        keep = max(0, target - self.emitted)
        self.emitted += min(keep, len(out))
        return out[:keep]

    def _blocks(self, end: int, final: bool) -> np.ndarray:
        j0, o, w = self.next_block, self.o, self.width
        if end <= j0:
            return np.zeros(0, np.float32)
        lo, hi = j0 * o - w, end * o + w  # input range, in samples of the whole signal
        have_lo, have_hi = max(lo, 0), min(hi, self.length)
        seg = self.buf[have_lo - self.buf_start : have_hi - self.buf_start]
        if have_lo > lo or have_hi < hi:
            seg = np.concatenate([np.zeros(have_lo - lo, np.float32), seg, np.zeros(hi - have_hi, np.float32)])
        out = torch.nn.functional.conv1d(torch.from_numpy(seg)[None, None], self.kernel, stride=o)  # (1, n, B)
        out = out[0].T.reshape(-1).numpy()  # (B·n,)
        self.next_block = end
        if not final:
            drop = max(0, end * o - w) - self.buf_start
            self.buf, self.buf_start = self.buf[drop:], self.buf_start + drop
            self.emitted += len(out)
        return out


# ---- log-mel -------------------------------------------------------------------------------------------

class StreamingMel:
    """`MelFrontEnd` frames of a waveform fed in blocks: (n, mels) float32 rows as they complete.

    Frame t reads samples [t·hop − n_fft/2, t·hop + n_fft/2), reflected at the true ends only."""

    def __init__(self, frontend: MelFrontEnd):
        self.frontend = frontend
        self.n_fft, self.hop = frontend.cfg.n_fft, frontend.cfg.hop_length
        self.pad = self.n_fft // 2
        self.buf = np.zeros(0, np.float32)
        self.buf_start = 0
        self.length = 0
        self.next_frame = 0

    def feed(self, x: np.ndarray) -> tuple[int, torch.Tensor]:
        """-> (first frame index, (n, mels) rows)."""
        self.buf = np.concatenate([self.buf, np.asarray(x, np.float32)])
        self.length += len(x)
        if self.length <= self.pad:  # the left reflection needs pad + 1 samples
            return self.next_frame, torch.zeros(0, self.frontend.cfg.n_mels)
        end = (self.length - self.pad) // self.hop + 1  # frames whose samples are all present
        return self._frames(end, final=False)

    def finish(self) -> tuple[int, torch.Tensor]:
        if self.length <= self.pad:
            raise ValueError(f"need more than {self.pad} samples for the reflect-padded STFT, got {self.length}")
        return self._frames(self.length // self.hop + 1, final=True)

    def _frames(self, end: int, final: bool) -> tuple[int, torch.Tensor]:
        t0 = self.next_frame
        if end <= t0:
            return t0, torch.zeros(0, self.frontend.cfg.n_mels)
        idx = np.arange(t0 * self.hop - self.pad, (end - 1) * self.hop + self.pad)
        idx = np.abs(idx)  # the reflect padding before sample 0
        if final:
            last = self.length - 1
            idx = np.where(idx > last, 2 * last - idx, idx)  # ... and after the last sample
        fe = self.frontend
        seg = torch.from_numpy(self.buf[idx - self.buf_start]).to(device=fe.mel_fb.device, dtype=fe.compute_dtype)
        frames = seg.unfold(0, self.n_fft, self.hop)  # (end - t0, n_fft)
        rows = torch.cat([fe.log_mel(frames[i : i + fe.block_frames])
                          for i in range(0, frames.shape[0], fe.block_frames)]).cpu()
        self.next_frame = end
        keep_from = max(0, end * self.hop - self.pad)  # the next frame's first sample
        drop = keep_from - self.buf_start
        if drop > 0 and not final:
            self.buf, self.buf_start = self.buf[drop:], keep_from
        return t0, rows


def resize_rows(total: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source rows and weights of torch's bilinear resize (align_corners=False) of `total` rows to `size`.

    Output row i = w0[i]·row[i0[i]] + w1[i]·row[i1[i]]. The weights are ATen's float32 ones: source position
    scale·(i + 0.5) − 0.5 with scale = total/size, rounded once (as its CPU kernel's fused multiply-add does)."""
    f32 = np.float32
    if total == size:
        i = np.arange(size)
        return i, i, np.ones(size, f32), np.zeros(size, f32)
    scale = f32(total) / f32(size)
    real = (np.float64(scale) * (np.arange(size) + 0.5) - 0.5).astype(f32)  # exact product, one rounding
    real = np.maximum(real, f32(0.0))
    i0 = np.minimum(np.floor(real).astype(np.int64), total - 1)
    w1 = np.clip(real - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
    i1 = np.where(i0 < total - 1, i0 + 1, i0)
    return i0, i1, (f32(1.0) - w1).astype(f32), w1


def resize_combine(r0: torch.Tensor, r1: torch.Tensor, w0: np.ndarray, w1: np.ndarray) -> torch.Tensor:
    """(size, F) rows → w0·r0 + w1·r1 in float32, the second product added with one rounding (fma)."""
    second = r1 * torch.from_numpy(w1)[:, None]
    return (r0.double() * torch.from_numpy(w0).double()[:, None] + second.double()).float()


class FusionCollector:
    """The fusion stack of a `total`-frame mel fed in order, keeping only the rows it reads.

    Equals `build_fusion_input(mel)`: [squeeze, front, middle, back] for a mel longer than one chunk,
    the mel four times (not longer) for exactly one chunk."""

    def __init__(self, total: int, chunk: int, n_mels: int):
        if total < chunk:
            raise ValueError(f"a fusion stack needs at least {chunk} frames, got {total}")
        self.total, self.chunk = total, chunk
        self.longer = total > chunk
        self.starts = fusion_crop_starts(total, chunk) if self.longer else (0,)
        self.crops = torch.zeros(len(self.starts), chunk, n_mels)
        self.i0, self.i1, self.w0, self.w1 = resize_rows(total, chunk)
        self.needed = np.unique(np.concatenate([self.i0, self.i1]))  # sorted
        self.rows = torch.zeros(len(self.needed), n_mels)
        self.seen = 0

    def offer(self, t0: int, rows: torch.Tensor) -> None:
        t1 = t0 + rows.shape[0]
        for c, s in enumerate(self.starts):
            lo, hi = max(s, t0), min(s + self.chunk, t1)
            if lo < hi:
                self.crops[c, lo - s : hi - s] = rows[lo - t0 : hi - t0]
        a, b = np.searchsorted(self.needed, [t0, t1])
        if a < b:
            self.rows[a:b] = rows[torch.from_numpy(self.needed[a:b] - t0)]
        self.seen = max(self.seen, t1)

    def features(self) -> tuple[torch.Tensor, bool]:
        """-> ((4, chunk, mels), is_longer)."""
        if self.seen != self.total:
            raise ValueError(f"fusion stack fed {self.seen} of {self.total} frames")
        if not self.longer:
            return self.crops.expand(4, -1, -1).contiguous(), False
        pos = {int(r): k for k, r in enumerate(self.needed)}
        r0 = self.rows[[pos[int(i)] for i in self.i0]]
        r1 = self.rows[[pos[int(i)] for i in self.i1]]
        squeeze = resize_combine(r0, r1, self.w0, self.w1)
        return torch.cat([squeeze[None], self.crops]), True  # (4, chunk, mels)


# ---- files → pieces ------------------------------------------------------------------------------------

class _ModelRate:
    """Source blocks → mono, resampled, int16-quantised blocks at the model rate."""

    def __init__(self, reader: MonoReader, opts: StreamOptions):
        self.reader, self.opts = reader, opts
        self.resampler = StreamResampler(_source_rate(reader.info.sample_rate, opts), opts.sample_rate)

    def __iter__(self) -> Iterator[np.ndarray]:
        for block in self.reader:
            out = self.resampler.feed(block)
            if len(out):
                yield quantize_int16(out) if self.opts.quantize else out
        out = self.resampler.finish()
        if len(out):
            yield quantize_int16(out) if self.opts.quantize else out


def _source_rate(sr: int, opts: StreamOptions) -> int:
    """The rate resampled from, as `to_model_rate` takes it (a rate with a huge exact kernel is rounded)."""
    return sr if sr == opts.sample_rate else _resampling_rate(sr, opts.sample_rate)


def _open_reader(path: str, opts: StreamOptions) -> MonoReader:
    reader = MonoReader(path)
    reader.block_frames = stream_block_frames(reader.info.sample_rate, reader.info.channels, opts)
    return reader


def stream_block_frames(sample_rate: int, channels: int, opts: StreamOptions) -> int:
    """Source frames per block: `block_seconds` of audio, bounded in bytes (decode.MAX_BLOCK_BYTES) so that a
    header declaring 1024 channels at 768 kHz still reads blocks of at most that size."""
    wanted = max(1024, int(sample_rate * (opts.block_seconds or BLOCK_SECONDS)))
    return bounded_block_frames(channels, wanted)


def _mel_frames(samples: int, opts: StreamOptions) -> int:
    return samples // opts.frontend.hop_length + 1


def file_pieces(index: int, path: str, opts: StreamOptions, frontend: MelFrontEnd | None = None) -> Iterator[Piece]:
    """The pieces of one file (see the module docstring); never raises for a bad file."""
    try:
        yield from _file_pieces(index, path, opts, frontend)
    except AudioDecodeError as exc:
        yield Piece(index, path, "error", error=exc.reason, error_kind=failure_kind(exc))
    except ClapError as exc:
        yield Piece(index, path, "error", error=str(exc), error_kind=failure_kind(exc))
    except (OSError, RuntimeError, ValueError, MemoryError) as exc:
        yield Piece(index, path, "error", error=f"{type(exc).__name__}: {exc}", error_kind=failure_kind(exc))


def _file_pieces(index: int, path: str, opts: StreamOptions, frontend: MelFrontEnd | None) -> Iterator[Piece]:
    clip, sr = opts.clip_samples, opts.sample_rate
    with _open_reader(path, opts) as reader:
        info = reader.info
        expected = resampled_length(info.frames, _source_rate(info.sample_rate, opts), sr)

        def piece(kind: str, **fields) -> Piece:
            return Piece(index, path, kind, expected_seconds=expected / sr, **fields)

        fusion = None
        mel = None
        if opts.fusion and expected > clip:
            frontend = frontend or MelFrontEnd(opts.frontend)
            mel = StreamingMel(frontend)
            fusion = FusionCollector(_mel_frames(expected, opts), opts.frontend.clip_frames, opts.frontend.n_mels)
        head: list[np.ndarray] = []  # the samples while the file is at most one clip long
        window = np.zeros(0, np.float32)  # rolling buffer: samples from window_at on
        window_at = 0  # first sample held in `window`
        next_start = 0  # the next full window to emit
        total = reported = 0
        long = False
        for block in _ModelRate(reader, opts):
            total += len(block)
            if mel is not None and fusion is not None:
                t0, rows = mel.feed(block)
                if fusion.total >= t0 + rows.shape[0]:
                    fusion.offer(t0, rows)
                else:
                    fusion = mel = None  # longer than the header said: a second pass builds the stack
            if not long:
                head.append(block)
                if total <= clip:
                    continue
                long = True
                block = np.concatenate(head)
                head = []
            if not opts.windows:
                yield piece("progress", seconds=(total - reported) / sr)
                reported = total
                continue
            window = np.concatenate([window, block]) if len(window) else block
            # A window is full coverage only if audio follows it; the last one is aligned to the end later.
            while next_start + clip < total:
                a = next_start - window_at
                yield piece("window", seconds=(min(total, next_start + clip) - reported) / sr,
                            samples=window[a : a + clip].copy(), start=next_start)
                reported = max(reported, min(total, next_start + clip))
                next_start += clip
            keep_from = min(next_start, total - clip)
            window, window_at = window[keep_from - window_at :], keep_from
        partial, messages, channels, source_sr = reader.partial, reader.messages, info.channels, info.sample_rate

    if total == 0:
        yield piece("error", error="no audio frames", error_kind=DATA_FAILURE, messages=messages)
        return
    if not long:
        yield piece("clip", samples=np.concatenate(head) if len(head) > 1 else head[0])
    else:
        if opts.windows:  # the last window, aligned to the end
            yield piece("window", samples=window[total - clip - window_at :].copy(), start=total - clip)
        if opts.fusion:
            if fusion is not None and mel is not None and fusion.total == _mel_frames(total, opts):
                t0, rows = mel.finish()
                fusion.offer(t0, rows)
            else:  # the header's length was wrong: build the stack again knowing the real one
                fusion = _second_pass(path, opts, total, frontend)
            features, longer = fusion.features()
            yield piece("fusion", features=features, longer=longer)
    yield piece("end", seconds=(total - reported) / sr, samples_total=total, sample_rate=source_sr,
                channels=channels, partial=partial, messages=messages)


def _second_pass(path: str, opts: StreamOptions, total: int, frontend: MelFrontEnd | None) -> FusionCollector:
    frontend = frontend or MelFrontEnd(opts.frontend)
    mel = StreamingMel(frontend)
    fusion = FusionCollector(_mel_frames(total, opts), opts.frontend.clip_frames, opts.frontend.n_mels)
    seen = 0
    with _open_reader(path, opts) as reader:
        for block in _ModelRate(reader, opts):
            block = block[: max(0, total - seen)]
            seen += len(block)
            fusion.offer(*mel.feed(block))
    if seen != total:
        raise ClapError(f"decoded {seen} samples on a second pass, {total} on the first")
    fusion.offer(*mel.finish())
    return fusion


class _PieceStream(torch.utils.data.IterableDataset):
    """Worker k streams files order[k], order[k + W], …; the DataLoader interleaves the workers' pieces.

    `skip[i]` pieces of file i are dropped (handed over before a worker crash restarted the stream); worker k
    writes its pid to `pids[k]` and the index of the file it is decoding to `current[k]` (-1 between files),
    so that a worker that dies can be blamed on its file (shared memory: written before the crash, whatever
    the queue to the parent still held)."""

    def __init__(self, paths: Sequence[str], opts: StreamOptions, order: Sequence[int] | None = None,
                 skip: dict[int, int] | None = None, pids=None, current=None):
        self.paths, self.opts = list(paths), opts
        self.order = list(range(len(self.paths))) if order is None else list(order)
        self.skip, self.pids, self.current = dict(skip or {}), pids, current

    def __iter__(self) -> Iterator[Piece]:
        info = torch.utils.data.get_worker_info()
        k, step = (info.id, info.num_workers) if info is not None else (0, 1)
        frontend = MelFrontEnd(self.opts.frontend) if self.opts.fusion else None
        if self.pids is not None:
            self.pids[k] = os.getpid()
        for i in self.order[k::step]:
            if self.current is not None:
                self.current[k] = i
            for n, piece in enumerate(file_pieces(i, self.paths[i], self.opts, frontend)):
                if n >= self.skip.get(i, 0):
                    if piece.samples is not None:
                        # to the parent through shared memory, like `features`: what goes down the pipe is then
                        # a message short enough to be written at once, so a worker killed while sending
                        # leaves no half message that would block the parent's read for ever
                        piece.samples = torch.from_numpy(piece.samples)
                    yield piece
            if self.current is not None:
                self.current[k] = -1


def iter_pieces(paths: Sequence, opts: StreamOptions, workers: int = 0,
                frontend: MelFrontEnd | None = None) -> Iterator[Piece]:
    """Pieces of every file; each file's pieces in order, files interleaved when `workers` > 0.

    `frontend` (inline decoding only) computes the fusion mel, e.g. on the model's device. A decode worker
    that dies (a decoder's segfault on a poisoned file, the OOM killer) is blamed on the file it was decoding:
    that file gets an "error" piece saying so, and fresh workers carry on with the files not yet finished
    (a file some of whose pieces were handed over goes on from where it was)."""
    from .loader import MIN_FILES_FOR_WORKERS

    paths = [os.fspath(p) for p in paths]
    if workers <= 0 or len(paths) < MIN_FILES_FOR_WORKERS:
        for i, p in enumerate(paths):
            yield from file_pieces(i, p, opts, frontend)
        return
    todo = list(range(len(paths)))  # files not finished, in input order
    handed: dict[int, int] = {}  # pieces handed over of each file not finished
    while todo:
        finished: set[int] = set()
        num = min(workers, len(todo))
        pids, current = _shared_slots(num), _shared_slots(num)
        it = _piece_loader(_PieceStream(paths, opts, todo, handed, pids, current), num)
        try:
            for piece in it:
                if isinstance(piece.samples, torch.Tensor):
                    piece.samples = piece.samples.numpy()
                if piece.kind in ("end", "error"):
                    finished.add(piece.index)
                    handed.pop(piece.index, None)
                else:
                    handed[piece.index] = handed.get(piece.index, 0) + 1
                yield piece
            return
        except RuntimeError as exc:
            blamed = _blame_dead_workers(exc, it, pids, current, finished)
            if not blamed:
                raise
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # the surviving workers stop before fresh ones start
        for i, reason, kind in blamed:
            handed.pop(i, None)
            finished.add(i)
            yield Piece(i, paths[i], "error", error=reason, error_kind=kind)
        todo = [i for i in todo if i not in finished]


def _piece_loader(stream: _PieceStream, num_workers: int):
    """An iterator over a DataLoader of `stream` whose workers' deaths are raised only from `next()`.

    torch's SIGCHLD handler raises a worker's death as a RuntimeError wherever the main thread happens to be
    (in the middle of a forward pass, a database commit); unregistered, the workers' death is found by the
    iterator itself, which raises it from `next()` within a few seconds (torch's MP_STATUS_CHECK_INTERVAL),
    where `iter_pieces` can blame the file and carry on."""
    import functools

    from .loader import _identity, die_with_parent

    loader = torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=_identity,
        prefetch_factor=4,  # pieces waiting per worker: each at most one 10 s window or one fusion stack
        persistent_workers=False,
        worker_init_fn=functools.partial(die_with_parent, os.getpid()),
    )
    it = iter(loader)
    if getattr(it, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False
    return it


def _shared_slots(n: int):
    """n int64 slots in shared memory, -1 each; None where shared memory cannot be had (then a dead worker
    cannot be blamed on its file, and its death ends the run as before)."""
    import multiprocessing

    try:
        slots = multiprocessing.RawArray("q", n)
    except OSError:
        return None
    for k in range(n):
        slots[k] = -1
    return slots


def _blame_dead_workers(exc: RuntimeError, it, pids, current, finished: set[int]) -> list[tuple[int, str, str]]:
    """(file index, reason, failure kind) for each worker named dead by the DataLoader's `exc` that was
    decoding a file; [] when `exc` is something else or no file can be named."""
    import re
    import signal

    from ..errors import DATA_FAILURE, ENVIRONMENT_FAILURE

    found = re.search(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)", str(exc))
    if found is None or pids is None or current is None:
        return []
    dead = {int(p) for p in found.group(1).split(",") if p.strip()}
    processes = getattr(it, "_workers", [])
    blamed = []
    for k in range(len(pids)):
        i = current[k]
        if pids[k] not in dead or i < 0 or i in finished:
            continue
        code = processes[k].exitcode if k < len(processes) else None
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            how = f"killed by {name}"
        else:
            how = "exited unexpectedly" if code is None else f"exited with code {code}"
        # SIGKILL is the OOM killer's (or someone's) doing, not the file's: tried again on the next run
        kind = ENVIRONMENT_FAILURE if code in (None, -signal.SIGKILL) else DATA_FAILURE
        blamed.append((i, f"the decoder crashed its worker process ({how})", kind))
    return blamed
