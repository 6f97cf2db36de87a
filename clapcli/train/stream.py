"""The training data stream: shards → (rank, worker) slots → shuffle buffer → batches.

Why not webdataset's own `detshuffle → split_by_node → split_by_worker → shuffle` chain: its shuffle buffer
and epoch bookkeeping cannot be replayed to a given batch, and its `with_epoch` leaves ranks with unequal
batch counts when shards are few. Here (tar members are still read through the shard reader):

- Each epoch orders the shards with a generator seeded by (seed, epoch). The rank×worker "slots" then get
  whole shards (shard j → slot j mod S) when that keeps the slots nearly even, else every slot reads all
  shards and keeps every S-th sample. Either way no sample goes to two slots in an epoch.
- `sizes.json` gives every slot's sample count up front, so every slot yields the SAME number of batches:
  steps per epoch = workers × min over slots of ⌊samples / batch⌋. Every rank runs the same number of
  steps, so no rank waits at an epoch end for a peer that has run out (the classic distributed hang).
- Each slot shuffles through a buffer seeded by (seed, epoch, slot), and a batch's crops and caption choice
  come from a generator seeded by (seed, epoch, slot, batch). The DataLoader hands out worker batches
  round-robin, so batch k of an epoch comes from worker k mod W: resuming at batch k skips exactly the
  batches each worker had produced, without decoding their audio, and rotates the workers so that the
  DataLoader's first one continues where the round robin stopped.
"""

from __future__ import annotations

import functools
import math
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..audio.loader import die_with_parent
from ..data.shards import (RawSample, ShardSplit, decode_audio, decode_frame, decode_image_embedding, iter_shard,
                           select_text)
from ..errors import DataError
from .batch import Batch, Collate, FrameBatch, ImageCollate


# Bytes of undecoded samples a data worker's shuffle buffer holds, besides its count (`shuffle_buffer`): 1000
# ten-second FLAC clips are about 0.5 GB, 1000 hour-long ones would be 100 GB. A full buffer emits samples
# until the next one fits.
SHUFFLE_BUFFER_BYTES = 1 << 30


@dataclass(frozen=True)
class Slot:
    shards: tuple[str, ...]  # shard paths this slot reads, in epoch order
    stride: int  # keep every stride-th sample of those shards …
    offset: int  # … starting at this one (stride 1, offset 0: all of them)
    samples: int  # how many samples that gives


def epoch_shards(split: ShardSplit, seed: int, epoch: int) -> list[str]:
    shards = list(split.urls)
    random.Random(f"{seed}/{epoch}/shards").shuffle(shards)
    return shards


def plan_slots(split: ShardSplit, seed: int, epoch: int, n_slots: int) -> list[Slot]:
    """Whole shards per slot when that loses little data (≥ 90% of an even split stays usable), else
    every slot reads every shard and keeps every n_slots-th sample."""
    shards = epoch_shards(split, seed, epoch)
    by_shard = [Slot(tuple(shards[s::n_slots]), 1, 0, sum(split.sizes[u] for u in shards[s::n_slots]))
                for s in range(n_slots)]
    total = split.num_samples
    if len(shards) >= n_slots and n_slots * min(s.samples for s in by_shard) >= 0.9 * (total - total % n_slots):
        return by_shard
    return [Slot(tuple(shards), n_slots, s, (total - s + n_slots - 1) // n_slots) for s in range(n_slots)]


def steps_per_epoch(split: ShardSplit, batch_size: int, world_size: int, workers: int, seed: int = 0) -> int:
    """Optimizer steps per epoch, equal on every rank; a DataError when the data cannot fill one batch."""
    w = max(1, workers)
    slots = plan_slots(split, seed, 0, world_size * w)
    per_slot = min(s.samples for s in slots) // batch_size
    if per_slot == 0:
        raise DataError(
            f"{split.num_samples} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} rank(s) × {w} data worker(s) (the smallest share has {min(s.samples for s in slots)}"
            f" samples); lower --batch-size or --workers, or add data"
        )
    return per_slot * w


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of batches for one rank. Iterated by a DataLoader with batch_size=None."""

    def __init__(self, split: ShardSplit, collate: Collate, *, batch_size: int, epoch: int, seed: int, rank: int,
                 world_size: int, workers: int, steps: int, skip: int = 0, text_source: str = "text",
                 shuffle_buffer: int = 1000, sample_rate: int = 48_000, quantize: bool = True):
        """With an `ImageCollate` the samples' image members replace their captions (Wav2CLIP data)."""
        super().__init__()
        self.split, self.collate = split, collate
        self.batch_size, self.epoch, self.seed = batch_size, epoch, seed
        self.rank, self.world_size, self.workers = rank, world_size, max(1, workers)
        self.steps, self.skip = steps, skip
        self.text_source, self.shuffle_buffer = text_source, shuffle_buffer
        self.sample_rate, self.quantize = sample_rate, quantize

    def __iter__(self) -> Iterator[tuple[list[str], Batch | FrameBatch] | DataError]:
        info = torch.utils.data.get_worker_info()
        w = self.workers
        # The DataLoader starts every epoch at its worker 0; after skipping k batches the next one is logical
        # worker k mod W's, so DataLoader worker i plays logical worker (i + k) mod W.
        worker = ((info.id if info is not None else 0) + self.skip) % w
        slot_id = self.rank * w + worker
        slot = plan_slots(self.split, self.seed, self.epoch, self.world_size * w)[slot_id]
        quota = self.steps // w  # batches this worker yields in the epoch
        skip = (self.skip - worker + w - 1) // w if self.skip > worker else 0  # batches k < skip with k % w == worker
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot_id}/buffer")
        batch, done = [], 0
        try:
            for raw in _shuffled(_slot_samples(slot), self.shuffle_buffer, rng, SHUFFLE_BUFFER_BYTES, _sample_bytes):
                batch.append(raw)
                if len(batch) < self.batch_size:
                    continue
                if done >= skip:
                    yield self._make_batch(batch, slot_id, done)
                batch, done = [], done + 1
                if done >= quota:
                    return
        except DataError as exc:  # raised again in the training process, as one clean line
            yield exc
            return
        if done < quota:
            yield DataError(f"a data worker ran out after {done} of {quota} batches: sizes.json counts more "
                            f"samples than the shards hold (run `clap shards info` on {self.split.directory})")

    def _make_batch(self, raws: list, slot_id: int, number: int) -> tuple[list[str], Batch | FrameBatch]:
        gen = np.random.default_rng([self.seed, self.epoch, slot_id, number])
        if isinstance(self.collate, ImageCollate):
            waves = [decode_audio(raw, self.sample_rate, self.quantize) for raw in raws]
            frames_ok = self.collate.preprocess is not None
            images = [sample_image(raw, self.collate.dim, frames_ok) for raw in raws]
            return [raw.key for raw in raws], self.collate(waves, images, gen)
        waves, texts = [], []
        for raw in raws:
            captions = select_text(raw.meta, self.text_source, key=f"{raw.url}: {raw.key}")
            texts.append(captions[int(gen.integers(len(captions)))])
            waves.append(decode_audio(raw, self.sample_rate, self.quantize))
        return [raw.key for raw in raws], self.collate(waves, texts, gen)


def sample_image(raw, dim: int, can_embed_frames: bool):
    """A sample's image: its `.npy` embedding (checked against the model's D = `dim`) or its decoded frame,
    which only a run with a teacher (`can_embed_frames`) can use."""
    if raw.image_ext is None:
        raise DataError("has no image member (.jpg frame or .npy embedding; `clap shards make --images` writes "
                        "them)", source=raw.url or None, member=raw.key)
    if raw.image_ext == "npy":
        vector = decode_image_embedding(raw)
        if vector.shape[0] != dim:
            raise DataError(f"image embedding has {vector.shape[0]} values, the model compares {dim}",
                            source=raw.url or None, member=f"{raw.key}.npy")
        return vector
    if not can_embed_frames:
        raise DataError("holds an image frame: pass --teacher CLIP_DIR to embed it", source=raw.url or None,
                        member=f"{raw.key}.{raw.image_ext}")
    return decode_frame(raw)


def _slot_samples(slot: Slot):
    index = 0
    for url in slot.shards:
        for raw in iter_shard(url):
            if index % slot.stride == slot.offset:
                yield raw
            index += 1


def _sample_bytes(raw: RawSample) -> int:
    return len(raw.audio_bytes) + len(raw.image_bytes or b"")


def _shuffled(items, buffer_size: int, rng: random.Random, max_bytes: int | None = None, size_of=None):
    """Reservoir-style shuffle buffer: fill, then emit a random element for each new one.

    With `max_bytes`, the buffer also holds at most that many bytes (`size_of(item)`; one item larger than
    that is held alone): before an item that does not fit, random elements are emitted until it does.
    When only the count binds, the order is that of the count-only buffer."""
    limit = math.inf if max_bytes is None else max_bytes
    buf: list = []
    held = 0  # bytes in buf
    for item in items:
        size = size_of(item) if max_bytes is not None else 0
        placed = False
        while buf and not placed and (len(buf) >= buffer_size or held + size > limit):
            i = rng.randrange(len(buf))
            out = buf[i]
            held -= size_of(out) if max_bytes is not None else 0
            if len(buf) <= buffer_size and held + size <= limit:
                buf[i], placed = item, True  # the new item takes the emitted one's place
            else:
                buf[i] = buf[-1]
                buf.pop()
            yield out
        if not placed:
            buf.append(item)
        held += size
    rng.shuffle(buf)
    yield from buf


def loader(stream: ShardStream, workers: int, pin_memory: bool = False):
    """A DataLoader over the stream. Workers are forked (as `clap index`'s decoders) and die with the training
    process even when it is killed with SIGKILL (`die_with_parent`), so a killed run leaves no orphans."""
    kwargs = {}
    if workers > 0:
        kwargs = dict(num_workers=workers, prefetch_factor=2, persistent_workers=False,
                      worker_init_fn=functools.partial(die_with_parent, os.getpid()))
    return torch.utils.data.DataLoader(stream, batch_size=None, pin_memory=pin_memory, **kwargs)
