"""The training loop's parts: schedule, optimizer groups, one step (accumulation, clipping, clamping),
and the data stream (disjoint slots, equal steps per rank, exact mid-epoch replay)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clapcli.models.clap import ClapModel
from clapcli.models.presets import preset
from clapcli.train.batch import Batch, Collate, random_crop_starts
from clapcli.train.config import TrainConfig
from clapcli.train.stream import ShardStream, plan_slots, steps_per_epoch
from clapcli.train.loop import lr_at, make_optimizer, train_step
from clapcli.train.loss import ClipLoss
from clapcli.data.shard_writer import ShardWriter
from clapcli.data.shards import resolve_split
from train_data import CAPTIONS, KINDS, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def tiny_model(tokenizer, seed=0, fused=True):
    torch.manual_seed(seed)
    cfg = preset("tiny" if fused else "tiny-unfused")
    cfg.text.vocab_size = len(tokenizer)
    return ClapModel(cfg)


def random_batch(model, tokenizer, n=8, seed=0) -> Batch:
    gen = np.random.default_rng(seed)
    fe = model.config.frontend
    waves = []
    for i in range(n):
        t = np.arange(int(fe.sample_rate * gen.uniform(0.5, 1.5))) / fe.sample_rate
        freq = 100 * 2 ** (i % 4 * 1.5)  # four kinds of tone, each with noise of its own
        waves.append((0.5 * np.sin(2 * np.pi * freq * t) + 0.05 * gen.standard_normal(len(t))).astype(np.float32))
    texts = [CAPTIONS[KINDS[i % 4]][i // 4 % 4] for i in range(n)]
    return Collate(fe, model.config.fused, tokenizer, model.config.text.max_length)(waves, texts, gen)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_zero():
    lrs = [lr_at(s, 1.0, 4, 12) for s in range(12)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[8] == pytest.approx(0.5) and lr_at(12, 1.0, 4, 12) == pytest.approx(0)
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))


def test_weight_decay_spares_norms_biases_and_logit_scales(tokenizer):
    model = tiny_model(tokenizer)
    opt = make_optimizer(model, TrainConfig(data="", out="", wd=0.1))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"logit_scale_a", "logit_scale_t", "audio_projection.linear1.bias"} <= spared
    assert "audio_projection.linear1.weight" in {names[id(p)] for p in decay["params"]}
    assert not any(n.endswith(".bias") or "norm" in n for n in (names[id(p)] for p in decay["params"]))


def test_train_steps_overfit_a_fixed_batch(tokenizer):
    model = tiny_model(tokenizer).train()
    batch = random_batch(model, tokenizer)
    opt = make_optimizer(model, TrainConfig(data="", out="", lr=1e-3))
    losses = [train_step(model, batch, ClipLoss(), opt) for _ in range(20)]
    assert losses[-1] < 0.5 * losses[0], losses  # seen: 2.16 → 0.46


def test_accumulated_micro_batches_give_the_whole_batch_gradient(tokenizer):
    """The feature-cache accumulation: K passes of B/K give the update of one pass of B. (Audio tower locked so
    BatchNorm uses its running statistics and the two are comparable exactly.)"""
    batch = None
    updated = []
    for k in (1, 2, 4):
        model = tiny_model(tokenizer, seed=3)
        model.lock_audio_tower()
        model.train()
        batch = batch or random_batch(model, tokenizer, n=8, seed=1)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        train_step(model, batch, ClipLoss(), opt, accum_steps=k)
        updated.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name, value in updated[0].items():
        torch.testing.assert_close(updated[1][name], value, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(updated[2][name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_naive_accumulation_would_differ(tokenizer):
    """Guard for the test above: splitting the batch into independent halves changes the update."""
    model = tiny_model(tokenizer, seed=3)
    model.lock_audio_tower()
    batch = random_batch(model, tokenizer, n=8, seed=1)
    full = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for half in zip(*(t.chunk(2) for t in batch)):
        opt.zero_grad()
        out = model(*half)
        ClipLoss()(out.audio_embeds, out.text_embeds, out.logit_scale_a).backward()
        opt.step()
    reference = tiny_model(tokenizer, seed=3)
    reference.lock_audio_tower()
    opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=1.0)
    train_step(reference, batch, ClipLoss(), opt, accum_steps=2)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(model.parameters(), reference.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(full, model.parameters()))


def test_gradient_clipping_bounds_the_update(tokenizer):
    model = tiny_model(tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    train_step(model, random_batch(model, tokenizer), ClipLoss(), opt, grad_clip=1e-3)
    step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    assert 0 < float(step) <= 1e-3 * 1.0001


def test_logit_scale_is_clamped_after_each_step(tokenizer):
    model = tiny_model(tokenizer)
    with torch.no_grad():
        model.logit_scale_a.fill_(7.0)
    train_step(model, random_batch(model, tokenizer), ClipLoss(), torch.optim.SGD(model.parameters(), lr=0.0))
    assert float(model.logit_scale_a.detach()) == pytest.approx(math.log(100))


def test_training_crops_are_random_but_seeded():
    a = random_crop_starts(3000, 1001, np.random.default_rng(1))
    b = random_crop_starts(3000, 1001, np.random.default_rng(1))
    draws = {random_crop_starts(3000, 1001, np.random.default_rng(s)) for s in range(20)}
    assert a == b and len(draws) > 10
    front, middle, back = a
    assert 0 <= front <= 666 < middle <= 1333 < back <= 1999


# ---------------------------------------------------------------------------------------------- data stream


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """5 shards of sizes 7, 7, 7, 7, 6 holding 34 one-second tones whose keys say their index."""
    from clapcli.data.shard_writer import encode_flac

    root = tmp_path_factory.mktemp("stream")
    writer = ShardWriter(root, shard_size=7)
    for i in range(34):
        t = np.arange(48_000) / 48_000
        wave = (0.3 * np.sin(2 * np.pi * (200 + 10 * i) * t)).astype(np.float32)
        writer.add(f"s{i:03d}", encode_flac(wave), {"text": [f"tone {i}", f"note {i}"]})
    writer.close()
    return resolve_split(root)


class KeysOnly:
    """A collate that returns the captions, to follow which sample went where without a model."""

    def __call__(self, waves, texts, gen):
        return list(texts)


def epoch_keys(split, rank, world, workers, batch, epoch=0, skip=0, steps=None):
    steps = steps or steps_per_epoch(split, batch, world, workers)
    out = []
    stream = ShardStream(split, KeysOnly(), batch_size=batch, epoch=epoch, seed=5, rank=rank, world_size=world,
                         workers=workers, steps=steps, skip=skip)
    # emulate the DataLoader's round-robin over workers: batch k comes from worker k mod W
    per_worker = [_as_worker(stream, w, max(1, workers)) for w in range(max(1, workers))]
    k = 0  # the DataLoader starts at its worker 0, whatever the skip
    while any(per_worker):
        w = k % max(1, workers)
        if not per_worker[w]:
            break
        keys, _ = per_worker[w].pop(0)
        out.append(keys)
        k += 1
    return out


def _as_worker(stream, worker, workers):
    import clapcli.train.stream as data

    class Info:
        id = worker
        num_workers = workers

    real = torch.utils.data.get_worker_info
    data.torch.utils.data.get_worker_info = lambda: Info()
    try:
        return list(iter(stream))
    finally:
        data.torch.utils.data.get_worker_info = real


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 2), (3, 2)])
def test_ranks_and_workers_get_disjoint_samples_and_equal_steps(shard_dir, world, workers):
    steps = steps_per_epoch(shard_dir, 3, world, workers)
    seen = []
    for rank in range(world):
        batches = epoch_keys(shard_dir, rank, world, workers, 3)
        assert len(batches) == steps  # the same number of steps on every rank: nobody hangs at the epoch end
        seen += [k for b in batches for k in b]
    assert len(seen) == len(set(seen))
    assert len(seen) == steps * 3 * world
    slots = plan_slots(shard_dir, 5, 0, world * workers)
    assert sum(s.samples for s in slots) == 34


def test_epochs_shuffle_differently_and_reproducibly(shard_dir):
    a0 = epoch_keys(shard_dir, 0, 1, 1, 4, epoch=0)
    assert a0 == epoch_keys(shard_dir, 0, 1, 1, 4, epoch=0)
    assert a0 != epoch_keys(shard_dir, 0, 1, 1, 4, epoch=1)


@pytest.mark.parametrize("workers", [1, 2])
def test_resuming_mid_epoch_replays_exactly_the_remaining_batches(shard_dir, workers):
    straight = epoch_keys(shard_dir, 0, 1, workers, 3)
    for skip in (1, 3, 4):
        assert epoch_keys(shard_dir, 0, 1, workers, 3, skip=skip) == straight[skip:]


def test_too_little_data_for_a_batch_is_a_clear_error(shard_dir):
    from clapcli.errors import DataError

    with pytest.raises(DataError, match="lower --batch-size"):
        steps_per_epoch(shard_dir, 64, 1, 1)


def test_text_source_picks_the_caption_field(tmp_path):
    from clapcli.data.shard_writer import encode_flac

    writer = ShardWriter(tmp_path, shard_size=8)
    for i in range(4):
        writer.add(f"s{i}", encode_flac(np.full(4800, 0.1, np.float32)),
                   {"text": f"template {i}", "text_augment_t5": f"k2c {i}",
                    "text_augment_all": [f"template {i}", f"k2c {i}"]})
    writer.close()
    split = resolve_split(tmp_path)

    def captions(source):
        stream = ShardStream(split, KeysOnly(), batch_size=4, epoch=0, seed=0, rank=0, world_size=1, workers=1,
                             steps=1, text_source=source)
        return sorted(text for _, texts in stream for text in texts)

    assert captions("text") == [f"template {i}" for i in range(4)]
    assert captions("k2c") == [f"k2c {i}" for i in range(4)]
    assert set(captions("all")) <= {f"{kind} {i}" for kind in ("template", "k2c") for i in range(4)}


def test_sizes_json_promising_more_than_the_shards_hold_is_a_data_error(shard_dir, tmp_path):
    import dataclasses

    from clapcli.errors import DataError

    inflated = dataclasses.replace(shard_dir, sizes={u: n + 3 for u, n in shard_dir.sizes.items()},
                                   num_samples=shard_dir.num_samples + 15)
    items = list(ShardStream(inflated, KeysOnly(), batch_size=4, epoch=0, seed=0, rank=0, world_size=1, workers=1,
                             steps=steps_per_epoch(inflated, 4, 1, 1)))
    assert isinstance(items[-1], DataError) and "clap shards info" in str(items[-1])


def test_shuffle_buffer_is_bounded_by_bytes_as_well_as_count():
    """200 samples of 100 bytes through a 1000-sample, 1000-byte buffer: at most ~10 samples are held at
    once (a count-only buffer holds all 200 before emitting one); with room to spare the order is the
    count-only buffer's, so runs and their resumes are unchanged."""
    import random

    from clapcli.train.stream import _shuffled

    items = [bytes([i % 256]) * 100 + i.to_bytes(2, "big") for i in range(200)]
    pulled, held_most, out = 0, 0, []

    def source():
        nonlocal pulled
        for item in items:
            pulled += 1
            yield item

    for item in _shuffled(source(), 1000, random.Random(3), max_bytes=1000, size_of=len):
        out.append(item)
        held_most = max(held_most, pulled - len(out))
    assert sorted(out) == sorted(items) and out != items
    assert held_most * 102 <= 1000 + 102  # the buffer's bytes, and the one sample waiting to go in
    again = list(_shuffled(iter(items), 1000, random.Random(3), max_bytes=1000, size_of=len))
    assert again == out  # seeded: a resume replays it
    counted = list(_shuffled(iter(items), 50, random.Random(4)))
    assert list(_shuffled(iter(items), 50, random.Random(4), max_bytes=1 << 30, size_of=len)) == counted
    huge = [b"x" * 5000, b"y", b"z" * 5000]  # a sample larger than the whole budget is held alone
    assert sorted(_shuffled(iter(huge), 1000, random.Random(0), max_bytes=1000, size_of=len)) == sorted(huge)


def test_the_stream_shuffles_within_its_byte_budget(shard_dir, monkeypatch):
    import clapcli.train.stream as data
    from clapcli.train.stream import epoch_shards
    from clapcli.data.shards import iter_shard

    shuffled = [k for batch in epoch_keys(shard_dir, 0, 1, 1, 4) for k in batch]
    monkeypatch.setattr(data, "SHUFFLE_BUFFER_BYTES", 1)  # one sample at a time: nothing to shuffle
    stored = [k for batch in epoch_keys(shard_dir, 0, 1, 1, 4) for k in batch]
    order = [int(raw.key[1:]) for url in epoch_shards(shard_dir, 5, 0) for raw in iter_shard(url)]
    assert stored != shuffled and [int(k[1:]) for k in stored] == order[: len(stored)]


@pytest.mark.parametrize("change, message", [
    ({"objective": "w2c"}, "--objective must be clap or wav2clip, got 'w2c'"),
    ({"text_source": "caption"}, "--text-source must be text, k2c or all, got 'caption'"),
    ({"precision": "int8"}, "--precision must be one of fp32, bf16, fp16, got 'int8'"),
    ({"batch_size": 6, "accum_steps": 4}, "--batch-size 6 is not a multiple of --accum-steps 4"),
    ({"best_metric": "loss"}, "--best-metric 'loss' is not a validation metric"),
])
def test_the_library_refuses_what_the_cli_refuses_before_any_work(tmp_path, change, message):
    """One check (TrainConfig.check) for `clap train` and for `train(cfg)` called from Python."""
    from clapcli.errors import UsageError
    from clapcli.train.loop import train

    cfg = TrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"), model_config="tiny", **change)
    with pytest.raises(UsageError, match=message):
        train(cfg)
    assert not (tmp_path / "run").exists()
