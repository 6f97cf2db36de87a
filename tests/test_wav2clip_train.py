"""Wav2CLIP distillation (`clap train --objective wav2clip --teacher CLIP_DIR`) and image shards
(`clap shards make --images`): the cross-projection loss by hand, the image head's training, frames and
precomputed embeddings giving the same image path, exact resume, and a tiny distillation run end to end."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import clap
from test_errors import run_main
from train_data import CAPTIONS, KINDS, SR, clip

CLIP_DIM = 32  # the tiny CLIP's joint dim = the projection dim of the tiny presets (HTSAT and Wav2CLIP)
KIND_COLOURS = {"hum": (200, 30, 30), "whistle": (30, 200, 30), "hiss": (30, 30, 200), "clicks": (220, 220, 40)}


# --------------------------------------------------------------------------------------------------- helpers


def clip_tokenizer(words=()):
    """A CLIP tokenizer over single bytes with "</w>" word ends, plus merges spelling out `words`: CLIP's rules,
    a vocabulary of a few hundred tokens."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = []
    for word in words:
        done = word[0]
        for k, c in enumerate(word[1:], 1):
            piece = c + ("</w>" if k == len(word) - 1 else "")
            if done + piece not in vocab:
                merges.append((done, piece))
                vocab[done + piece] = len(vocab)
            done += piece
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def save_tiny_clip(directory: Path, dim: int = CLIP_DIM, seed: int = 0) -> Path:
    """A random CLIP (vision + text towers, joint dim `dim`) with its image processor and tokenizer, offline."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    tok = clip_tokenizer([w for captions in CAPTIONS.values() for c in captions for w in c.split()])
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=dim,
                         bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eot,
                         pad_token_id=eot),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=dim),
        projection_dim=dim,
    )
    CLIPModel(cfg).save_pretrained(str(directory))
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        str(directory))
    tok.save_pretrained(str(directory))
    return directory


def frame_of(kind: str, rng: np.random.Generator, size=(40, 48)) -> np.ndarray:
    """An RGB frame that is a function of the sound's kind: its colour, with a stripe pattern per kind."""
    image = np.zeros((*size, 3), np.uint8)
    image[:] = KIND_COLOURS[kind]
    period = 4 + 4 * KINDS.index(kind)
    image[:, (np.arange(size[1]) // period) % 2 == 0] //= 3
    jitter = rng.integers(-6, 7, size=image.shape)
    return np.clip(image.astype(int) + jitter, 0, 255).astype(np.uint8)


def write_image(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(pixels).save(path)
    return path


def make_image_dataset(root: Path, per_kind: int, suffix: str = ".jpg", seed: int = 0) -> Path:
    """Clips of the four toy kinds, each with a frame of its kind; a manifest with an `image` column."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    (root / "frames").mkdir(exist_ok=True)
    rows = []
    for i in range(per_kind):
        for kind in KINDS:
            name = f"{kind}_{i:03d}"
            sf.write(root / "audio" / f"{name}.wav", clip(kind, rng), SR, subtype="PCM_16")
            write_image(root / "frames" / f"{name}{suffix}", frame_of(kind, rng))
            rows.append({"path": f"audio/{name}.wav", "image": f"frames/{name}{suffix}"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "image"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def samples(directory: Path):
    from clapcli.data.shards import iter_shard, resolve_split

    return [raw for url in resolve_split(directory).urls for raw in iter_shard(url)]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


@pytest.fixture(scope="module")
def teacher(tiny_clip):
    from clapcli.train.teacher import ImageTeacher

    return ImageTeacher(str(tiny_clip))


def htsat_model(seed: int = 0):
    """An HTSAT-tiny model (pooled output W = 128, projection D = 32): the objective takes any audio encoder."""
    from clapcli.models.clap import ClapModel
    from clapcli.models.presets import preset

    torch.manual_seed(seed)
    cfg = preset("tiny-unfused")
    cfg.text.vocab_size = 300
    return ClapModel(cfg)


# --------------------------------------------------------------------------------------------------- the loss


def _hand_clip(x: np.ndarray, y: np.ndarray, scale: float) -> float:
    """Symmetric InfoNCE written out: rows normalised, log-softmax by hand, both directions averaged."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    logits = scale * x @ y.T
    rows = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(len(x))])
    cols = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(len(x))])
    return (rows + cols) / 2


def test_cross_projection_loss_equals_a_hand_computation():
    from clapcli.train.objective import Wav2ClipLoss, Wav2ClipObjective, Wav2ClipTrainee

    model = htsat_model()
    trainee = Wav2ClipTrainee(model, Wav2ClipObjective(CLIP_DIM, 128)).eval()
    with torch.no_grad():
        trainee.objective.logit_scale_ai.fill_(np.log(7.0))
        trainee.objective.logit_scale_pi.fill_(np.log(3.0))
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(6, 1, model.config.frontend.clip_frames, 64, generator=gen)
    images = torch.randn(6, CLIP_DIM, generator=gen)
    loss = Wav2ClipLoss()(trainee(features, torch.zeros(6, dtype=torch.bool), images))

    with torch.no_grad():
        a = model.audio_model.audio_encoder(features, None).numpy()  # (6, 128) pooled: W = 128, D = 32
        w1, b1 = model.audio_projection.linear1.weight.numpy(), model.audio_projection.linear1.bias.numpy()
        w2, b2 = model.audio_projection.linear2.weight.numpy(), model.audio_projection.linear2.bias.numpy()
        h = trainee.objective.image_head
        v1, c1, v2, c2 = (t.numpy() for t in (h.linear1.weight, h.linear1.bias, h.linear2.weight, h.linear2.bias))
    img = images.numpy()
    audio_head = np.maximum(a @ w1.T + b1, 0) @ w2.T + b2
    image_head = np.maximum(img @ v1.T + c1, 0) @ v2.T + c2
    expected = (_hand_clip(a, image_head, 7.0) + _hand_clip(audio_head, img, 3.0)) / 2
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def test_steps_train_the_image_head_and_audio_side_but_never_the_text_side():
    from clapcli.train.batch import ImageBatch
    from clapcli.train.config import TrainConfig
    from clapcli.train.loop import make_optimizer, train_step
    from clapcli.train.objective import Wav2ClipLoss, Wav2ClipObjective, Wav2ClipTrainee

    model = htsat_model()
    trainee = Wav2ClipTrainee(model, Wav2ClipObjective(CLIP_DIM, 128)).train()
    before = {k: v.clone() for k, v in trainee.state_dict().items()}
    optimizer = make_optimizer(trainee, TrainConfig(data="", out="", lr=1e-3))
    gen = torch.Generator().manual_seed(2)
    images = torch.randn(4, CLIP_DIM, generator=gen).repeat(2, 1)  # two clips per image "kind"
    batch = ImageBatch(torch.randn(8, 1, model.config.frontend.clip_frames, 64, generator=gen),
                       torch.zeros(8, dtype=torch.bool), images)
    loss_fn = Wav2ClipLoss()
    trainee.objective.zero_grad()
    losses = [train_step(trainee, batch, loss_fn, optimizer) for _ in range(12)]
    after = trainee.state_dict()
    head = [k for k in after if k.startswith("objective.image_head.")]
    assert head and all(not torch.equal(after[k], before[k]) for k in head)  # the image head learns
    assert not torch.equal(after["objective.logit_scale_ai"], before["objective.logit_scale_ai"])
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("model.audio_projection."))
    text = [k for k in after if k.startswith(("model.text_", "model.logit_scale"))]
    assert text and all(torch.equal(after[k], before[k]) for k in text)  # text is not used
    assert losses[-1] < 0.7 * losses[0], losses


def test_accumulated_micro_batches_give_the_whole_batch_step():
    from clapcli.train.batch import ImageBatch
    from clapcli.train.config import TrainConfig
    from clapcli.train.loop import make_optimizer, train_step
    from clapcli.train.objective import Wav2ClipLoss, Wav2ClipObjective, Wav2ClipTrainee

    results = []
    for accum in (1, 2):
        model = htsat_model()
        model.lock_audio_tower()  # BatchNorm statistics would see micro-batches otherwise
        torch.manual_seed(5)
        trainee = Wav2ClipTrainee(model, Wav2ClipObjective(CLIP_DIM, 128)).train()
        optimizer = make_optimizer(trainee, TrainConfig(data="", out="", lr=1e-2))
        gen = torch.Generator().manual_seed(3)
        batch = ImageBatch(torch.randn(8, 1, model.config.frontend.clip_frames, 64, generator=gen),
                           torch.zeros(8, dtype=torch.bool), torch.randn(8, CLIP_DIM, generator=gen))
        loss = train_step(trainee, batch, Wav2ClipLoss(), optimizer, accum_steps=accum)
        results.append((loss, trainee.state_dict()))
    (loss1, s1), (loss2, s2) = results
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], atol=1e-6, rtol=1e-5, msg=key)
    assert any(not torch.equal(s1[k], htsat_model().state_dict()[k.removeprefix("model.")])
               for k in s1 if k.startswith("model.audio_projection."))


def test_image_embeddings_must_be_as_wide_as_the_projection():
    from clapcli.errors import UsageError
    from clapcli.train.objective import check_widths

    with pytest.raises(UsageError, match="--teacher embeds images to 64 values, the model's projection dim is 32"):
        check_widths(htsat_model(), 64)
    assert check_widths(htsat_model(), CLIP_DIM) == (CLIP_DIM, 128)  # the image head maps D = 32 to W = 128


def test_teacher_needs_a_vision_tower(tmp_path, tiny_clip):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from clapcli.errors import UsageError
    from clapcli.train.teacher import ImageTeacher

    text_only = tmp_path / "text-only"
    CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2)).save_pretrained(text_only)
    with pytest.raises(UsageError, match="without a CLIP vision tower"):
        ImageTeacher(str(text_only))
    with pytest.raises(UsageError, match="not a CLIP model directory"):
        ImageTeacher(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------------------------------- shards


def test_shards_store_frames_and_embeddings_and_info_reports_them(tmp_path, monkeypatch, capsys):
    from clapcli.data.shards import open_image

    manifest = make_image_dataset(tmp_path / "src", per_kind=1)
    rows = list(csv.DictReader(open(manifest)))
    # one frame as .png, one as a precomputed (frames, D) embedding stack, one missing, one without image
    png = write_image(tmp_path / "src" / "frames" / "hum.png", frame_of("hum", np.random.default_rng(0)))
    stack = np.random.default_rng(1).standard_normal((5, CLIP_DIM)).astype(np.float32)
    np.save(tmp_path / "src" / "frames" / "whistle.npy", stack)
    rows[0]["image"], rows[1]["image"], rows[2]["image"], rows[3]["image"] = (
        str(png), "frames/whistle.npy", "frames/gone.jpg", "")
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "image"])
        writer.writeheader()
        writer.writerows(rows)
    result = clap("shards", "make", manifest, "--out", tmp_path / "out", "--images", "image", "--json")
    report = json.loads(result.output.splitlines()[-1])
    assert report["samples"] == 2
    reasons = {Path(s["path"]).stem: s["reason"] for s in report["skipped"]}
    assert "gone.jpg" in reasons["hiss_000"] and "No such file" in reasons["hiss_000"]
    assert "no image in column 'image'" in reasons["clicks_000"]

    got = {raw.key.split("_", 1)[1]: raw for raw in samples(tmp_path / "out")}
    assert got["hum_000"].image_ext == "jpg"  # the PNG is stored as JPEG, close to the original pixels
    stored = np.asarray(open_image(got["hum_000"].image_bytes), dtype=float)
    original = np.asarray(open_image(png.read_bytes()), dtype=float)
    assert stored.shape == original.shape and np.abs(stored - original).mean() < 12  # noisy pixels: JPEG q95 is lossy
    assert got["whistle_000"].image_ext == "npy"
    vector = np.load(io.BytesIO(got["whistle_000"].image_bytes))
    assert vector.dtype == np.float32 and vector.shape == (CLIP_DIM,)
    np.testing.assert_allclose(vector, stack.mean(0), rtol=1e-6)  # frame embeddings averaged, as Wav2CLIP
    assert "text" not in got["whistle_000"].meta and got["whistle_000"].meta["original_image"].endswith(".npy")

    info = json.loads(clap("shards", "info", tmp_path / "out", "--json").output.splitlines()[0])
    assert (info["with_image_frame"], info["with_image_embedding"], info["image_embedding_dims"]) == (1, 1, [32])


def test_images_option_errors(tmp_path, monkeypatch, capsys):
    manifest = make_image_dataset(tmp_path / "src", per_kind=1)
    code, err = run_main(monkeypatch, capsys, "shards", "make", manifest, "--out", tmp_path / "o1", "--images",
                         "frame")
    assert code == 1 and "has no column 'frame'" in err and err.count("\n") == 1
    code, err = run_main(monkeypatch, capsys, "shards", "make", tmp_path / "src" / "audio", "--out",
                         tmp_path / "o2", "--images", "image")
    assert code == 2 and "--images names a manifest column" in err
    (tmp_path / "caps.csv").write_text("path,caption,image\nhum_000.wav,a hum,../frames/hum_000.jpg\n")
    result = clap("shards", "make", tmp_path / "src" / "audio", "--captions", tmp_path / "caps.csv", "--out",
                  tmp_path / "o4", "--images", "image", "--json")  # a folder: images from its --captions manifest
    assert json.loads(result.output.splitlines()[-1])["samples"] == 1
    (raw,) = samples(tmp_path / "o4")
    assert raw.image_bytes == (tmp_path / "src" / "frames" / "hum_000.jpg").read_bytes()  # a .jpg is kept as is
    assert raw.meta["text"] == "a hum"
    (tmp_path / "src" / "frames" / "hum_000.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    np.save(tmp_path / "src" / "frames" / "whistle_000.npy", np.zeros((2, 3, 4), np.float32))
    rows = list(csv.DictReader(open(manifest)))
    rows[1]["image"] = "frames/whistle_000.npy"
    rows[2]["image"] = "frames/hiss_000.gif"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "image"])
        writer.writeheader()
        writer.writerows(rows)
    result = clap("shards", "make", manifest, "--out", tmp_path / "o3", "--images", "image", "--json")
    reasons = {Path(s["path"]).stem: s["reason"] for s in json.loads(result.output.splitlines()[-1])["skipped"]}
    assert "cannot be decoded as an image" in reasons["hum_000"]
    assert "an image embedding is (D,)" in reasons["whistle_000"]
    assert "not a .jpg, .png or .npy" in reasons["hiss_000"]
    assert set(reasons) == {"hum_000", "whistle_000", "hiss_000"}


def test_frames_and_their_precomputed_embeddings_give_the_same_training_images(tmp_path, teacher):
    """The same clips once with .jpg frames (embedded by the teacher) and once with .npy files holding the
    teacher's embeddings of those frames: every batch carries the same image embeddings."""
    from clapcli.models.presets import preset
    from clapcli.train.batch import FrameBatch, ImageCollate
    from clapcli.train.stream import ShardStream
    from clapcli.data.shards import open_image, resolve_split

    manifest = make_image_dataset(tmp_path / "src", per_kind=3)
    clap("shards", "make", manifest, "--out", tmp_path / "jpg", "--images", "image", "--shard-size", "5")
    rows = list(csv.DictReader(open(manifest)))
    for row in rows:
        frame = open_image((tmp_path / "src" / row["image"]).read_bytes())
        npy = Path(row["image"]).with_suffix(".npy")
        np.save(tmp_path / "src" / npy, teacher.embed_frames([frame])[0].numpy())
        row["image"] = str(npy)
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "image"])
        writer.writeheader()
        writer.writerows(rows)
    clap("shards", "make", manifest, "--out", tmp_path / "npy", "--images", "image", "--shard-size", "5")

    fe = preset("tiny-unfused").frontend
    batches = {}
    for kind in ("jpg", "npy"):
        collate = ImageCollate(fe, False, CLIP_DIM, teacher.preprocess)
        stream = ShardStream(resolve_split(tmp_path / kind), collate, batch_size=4, epoch=0, seed=0, rank=0,
                             world_size=1, workers=0, steps=3, sample_rate=fe.sample_rate)
        batches[kind] = [(keys, b) for keys, b in stream]
    assert len(batches["jpg"]) == len(batches["npy"]) == 3
    for (keys_j, bj), (keys_n, bn) in zip(batches["jpg"], batches["npy"]):
        assert keys_j == keys_n and isinstance(bj, FrameBatch)
        assert bj.frame_rows.tolist() == [0, 1, 2, 3] and bn.frame_rows.numel() == 0
        torch.testing.assert_close(bj.features, bn.features)
        torch.testing.assert_close(bj.resolve(teacher.embed).images, bn.resolve(None).images, atol=1e-5, rtol=1e-5)

    # one batch mixing both kinds: frames land in their own rows, embeddings stay as stored
    rng = np.random.default_rng(3)
    frames = [open_image((tmp_path / "src" / Path(r["image"]).with_suffix(".jpg")).read_bytes()) for r in rows[:2]]
    stored = [np.load(tmp_path / "src" / r["image"]) for r in rows[2:4]]
    mixed = ImageCollate(fe, False, CLIP_DIM, teacher.preprocess)(
        [clip("hum", rng) for _ in range(4)], [stored[0], frames[0], stored[1], frames[1]], rng)
    assert mixed.frame_rows.tolist() == [1, 3]
    images = mixed.resolve(teacher.embed).images
    torch.testing.assert_close(images[[0, 2]], torch.from_numpy(np.stack(stored)))
    torch.testing.assert_close(images[[1, 3]], teacher.embed_frames(frames))

    # precomputed embeddings train without any teacher; the model keeps its text tower reference
    run = tmp_path / "run"
    clap("train", "--objective", "wav2clip", "--data", tmp_path / "npy", "--model-config", "tiny-wav2clip", "--out",
         run, "--workers", "0", "--batch-size", "4", "--max-steps", "2")
    config = json.loads((run / "final" / "config.json").read_text())["config"]
    assert config["text_tower"] == "openai/clip-vit-base-patch32"


# --------------------------------------------------------------------------------------------------- the CLI


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in log_records(run) if "loss" in r}


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    """Shards of the toy kinds with a frame per clip that is a function of the kind (train + val)."""
    root = tmp_path_factory.mktemp("w2c-data")
    manifest = make_image_dataset(root, per_kind=10)
    clap("shards", "make", manifest, "--out", root / "shards", "--images", "image", "--val-fraction", "0.2",
         "--shard-size", "8", "--seed", "1")
    return root / "shards"


@pytest.fixture(scope="module")
def roberta_tok(tmp_path_factory):
    from train_data import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def _w2c_args(data, run, teacher_dir, *extra, workers=0):
    return ["train", "--objective", "wav2clip", "--teacher", teacher_dir, "--data", data, "--out", run,
            "--workers", str(workers), "--log-every", "1", "--batch-size", "8", "--lr", "1e-3", "--warmup", "2",
            "--seed", "4", "--log-samples", *extra]


def test_distillation_learns_the_images_and_the_model_searches(image_shards, tiny_clip, tmp_path):
    """A tiny Wav2CLIP model distilled from the tiny CLIP: the loss falls, audio→image retrieval on the held-out
    split rises, and final/ is a model `clap index` and `clap search` use, its text side the teacher's tower.
    Two data workers: frames are decoded and preprocessed there, embedded by the teacher in the trainer."""
    run = tmp_path / "run"
    clap(*_w2c_args(image_shards, run, tiny_clip, "--model-config", "tiny-wav2clip", "--epochs", "6", workers=2))
    losses = [r["loss"] for r in step_records(run).values()]
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    val = [r["val"] for r in log_records(run) if "val" in r]
    assert len(val) == 6 and {"a2i_R@1", "a2i_mAP@10", "i2a_R@1", "i2a_mAP@10"} <= set(val[0])
    assert val[-1]["a2i_mAP@10"] > val[0]["a2i_mAP@10"], val
    state = torch.load(run / "final" / "trainer_state.pt", weights_only=True)
    assert set(state["objective"]) == {"image_head.linear1.weight", "image_head.linear1.bias",
                                       "image_head.linear2.weight", "image_head.linear2.bias",
                                       "logit_scale_ai", "logit_scale_pi"}
    assert {"logit_scale_ai", "logit_scale_pi"} <= set(step_records(run)[1])
    config = json.loads((run / "final" / "config.json").read_text())
    assert Path(config["config"]["text_tower"]).resolve() == tiny_clip.resolve()

    index = tmp_path / "index"
    clap("index", image_shards.parent / "audio", "--index", index, "--model", run / "final")
    for kind in KINDS:
        result = clap("search", CAPTIONS[kind][0], "--index", index, "--json", "-k", "5")
        hits = [json.loads(m) for m in re.findall(r'\{"rank".*\}', result.output)]  # stderr is mixed in
        assert len(hits) == 5 and all(Path(h["path"]).is_file() for h in hits), result.output


def test_resume_equals_a_straight_run_image_head_included(image_shards, tiny_clip, roberta_tok, tmp_path):
    """With an HTSAT model (any audio encoder distils): stopped after 3 steps and resumed = one straight run."""
    from safetensors.torch import load_file

    model = ["--model-config", "tiny", "--tokenizer", roberta_tok, "--epochs", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    clap(*_w2c_args(image_shards, straight, tiny_clip, *model))
    total = max(step_records(straight))
    clap(*_w2c_args(image_shards, resumed, tiny_clip, *model, "--max-steps", "3"))
    assert max(step_records(resumed)) == 3 < total
    clap(*_w2c_args(image_shards, resumed, tiny_clip, *model, "--resume"))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    sa = torch.load(straight / "final" / "trainer_state.pt", weights_only=True)
    sb = torch.load(resumed / "final" / "trainer_state.pt", weights_only=True)
    for key in sa["objective"]:
        torch.testing.assert_close(sb["objective"][key], sa["objective"][key], atol=1e-6, rtol=1e-5, msg=key)
    s, r = step_records(straight), step_records(resumed)
    assert [s[i]["keys"] for i in sorted(s)] == [r[i]["keys"] for i in sorted(r)]
    assert [s[i]["loss"] for i in sorted(s)] == pytest.approx([r[i]["loss"] for i in sorted(r)], rel=1e-4)


def test_training_errors_are_one_line(image_shards, tiny_clip, roberta_tok, tmp_path, monkeypatch, capsys):
    base = ["train", "--data", image_shards, "--workers", "0", "--batch-size", "4", "--max-steps", "1",
            "--model-config", "tiny-wav2clip"]
    code, err = run_main(monkeypatch, capsys, *base, "--out", tmp_path / "r1", "--teacher", tiny_clip)
    assert code == 2 and "--teacher is for --objective wav2clip" in err
    code, err = run_main(monkeypatch, capsys, *base, "--out", tmp_path / "r1b")  # the default objective: clap
    assert code == 2 and "a Wav2CLIP model has no text tower" in err and err.count("\n") == 1
    code, err = run_main(monkeypatch, capsys, *base, "--out", tmp_path / "r2", "--objective", "w2c")
    assert code == 2 and "--objective must be clap or wav2clip" in err
    wide = save_tiny_clip(tmp_path / "clip64", dim=64)
    capsys.readouterr()  # transformers' save progress
    code, err = run_main(monkeypatch, capsys, *base, "--out", tmp_path / "r3", "--objective", "wav2clip",
                         "--teacher", wide)
    assert code == 2 and "--teacher embeds images to 64 values, the model's projection dim is 32" in err
    assert err.count("\n") == 1
    code, err = run_main(monkeypatch, capsys, *base, "--out", tmp_path / "r4", "--objective", "wav2clip")
    error = err.splitlines()[-1]
    assert code == 1 and "Traceback" not in err and error.startswith("error: ") and ".tar: " in error
    assert error.endswith(".jpg: holds an image frame: pass --teacher CLIP_DIR to embed it")

    from clapcli.data.shard_writer import ShardWriter, encode_flac

    bad = ShardWriter(tmp_path / "bad", shard_size=8)
    for i in range(4):
        bad.add(f"k{i}", encode_flac(np.full(16_000, 0.1, np.float32)), {}, image=("jpg", b"\xff\xd8 broken"))
    bad.close()
    code, err = run_main(monkeypatch, capsys, *base[:2], tmp_path / "bad", *base[3:], "--out", tmp_path / "r5",
                         "--objective", "wav2clip", "--teacher", tiny_clip)
    error = err.splitlines()[-1]
    assert code == 1 and "Traceback" not in err
    assert re.match(r"error: .*000000\.tar: k\d\.jpg: cannot be decoded as an image", error), error


def test_init_continues_the_released_wav2clip_checkpoint(image_shards, tiny_clip, tmp_path):
    """`--init Wav2CLIP.pt` (the released layout): its audio weights are the starting point, they train, and
    final/ takes the teacher as its text tower."""
    from clapcli import load_model
    from test_wav2clip import original_state_dict, tiny_model

    released = tmp_path / "Wav2CLIP.pt"
    start = tiny_model(str(tiny_clip), seed=7)
    torch.save(original_state_dict(start), released)
    run = tmp_path / "run"
    clap(*_w2c_args(image_shards, run, tiny_clip, "--init", released, "--max-steps", "2"))
    after = load_model(run / "final", device="cpu")
    assert Path(after.config.text_tower).resolve() == tiny_clip.resolve()
    a, b = after.model.state_dict(), start.state_dict()
    audio = [k for k, _ in start.named_parameters() if k.startswith(("audio_model.", "audio_projection."))]
    assert all(a[k].shape == b[k].shape for k in audio)
    assert any(not torch.equal(a[k], b[k]) for k in audio)  # trained from there …
    close = [k for k in audio if torch.allclose(a[k], b[k], atol=0.05)]
    assert len(close) > 0.9 * len(audio)  # … two small steps away from the released weights, not a fresh init
    assert after.embed_text(["a dog"]).shape == (1, CLIP_DIM)  # CLIP's text side, through the teacher's tower


# --------------------------------------------------------------------------------------------------- two ranks


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    """Both terms gather through ClipLoss: two ranks of 3 under DDP give one process's loss and gradients on 6,
    for the image head and both logit scales too, with and without --local-loss."""
    import socket

    import torch.multiprocessing as mp

    from clapcli.train.objective import Wav2ClipLoss
    from wav2clip_ranks import ToyTrainee, toy_data, toy_rank

    data = toy_data()
    torch.save(data, tmp_path / "data.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = mp.start_processes(toy_rank, args=(port, str(tmp_path / "data.pt"), str(tmp_path)), nprocs=2,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not procs.join(timeout=5):
            assert time.monotonic() < deadline, "the two Gloo ranks did not finish within 240 s"
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.terminate()
    model = ToyTrainee().double()
    model.load_state_dict(data["state"])
    loss = Wav2ClipLoss()(model(data["audio"], data["images"]))
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for local in (False, True):
            torch.testing.assert_close(got[local]["loss"], loss.detach(), rtol=1e-6, atol=1e-7)
            for name, p in model.named_parameters():  # the loss runs in float32 (it casts, for AMP)
                torch.testing.assert_close(got[local]["grads"][name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
