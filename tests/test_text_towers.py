"""Text towers: BERT (pooler output, zero token types), CLIP text (EOT token + its projection), any other
transformers encoder from a directory (pooler, else masked mean); shapes, determinism, batch independence,
77-token truncation, own-format round trips and `clap train --text-model`. Tokenizers are trained here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_runner import clap
from clapcli import load_model
from clapcli.models.checkpoints import save_own
from clapcli.models.text import tokenize
from clapcli.train.prepare import fresh_model
from tiny_models import CORPUS

TEXTS = ["a dog barking in the distance", "rain", "glass shattering on a hard floor and birds chirping"]
LONG = " ".join(["thunder rumbling far away and a siren passing by"] * 30)


def _wordpiece():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


@pytest.fixture(scope="module")
def bert_tok(tmp_path_factory):
    """A BERT-style WordPiece tokenizer directory ([CLS] … [SEP], [PAD] = 0)."""
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("bert-tok")
    PreTrainedTokenizerFast(tokenizer_object=_wordpiece(), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]", model_max_length=512).save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def clip_tok(tmp_path_factory):
    """A CLIP-style byte-level BPE tokenizer directory (<|startoftext|> … <|endoftext|>, padded with EOT)."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("clip-tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=300, min_frequency=1, special_tokens=["<|startoftext|>",
                                                                                      "<|endoftext|>"])
    backend = bpe._tokenizer
    sot, eot = backend.token_to_id("<|startoftext|>"), backend.token_to_id("<|endoftext|>")
    backend.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A <|endoftext|>",
                                                           special_tokens=[("<|startoftext|>", sot),
                                                                           ("<|endoftext|>", eot)])
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                            model_max_length=77).save_pretrained(str(d))
    return d


def tower_model(name: str, tok_dir, seed: int = 0):
    torch.manual_seed(seed)
    model, tokenizer = fresh_model(name, None, str(tok_dir))
    return model.eval(), tokenizer


def embed(model, tokenizer, texts) -> torch.Tensor:
    tok = tokenize(tokenizer, texts, model.config.text.max_length)
    with torch.no_grad():
        return model.encode_text(tok["input_ids"], tok["attention_mask"])


@pytest.mark.parametrize("name, tok", [("tiny-bert", "bert_tok"), ("tiny-clip", "clip_tok")])
def test_shapes_determinism_and_batch_independence(name, tok, request):
    model, tokenizer = tower_model(name, request.getfixturevalue(tok))
    batch = embed(model, tokenizer, TEXTS)
    assert batch.shape == (3, 32) and torch.allclose(batch.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(batch, embed(model, tokenizer, TEXTS))
    alone = torch.cat([embed(model, tokenizer, [t]) for t in TEXTS])  # no padding when alone
    assert torch.allclose(batch, alone, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)


def test_bert_pools_the_pooler_output_with_zero_token_types(bert_tok):
    model, tokenizer = tower_model("tiny-bert", bert_tok)
    assert type(model.text_model).__name__ == "BertModel" and model.config.text.model_type == "bert"
    tok = tokenize(tokenizer, TEXTS, 77)
    with torch.no_grad():
        seen = {}
        model.text_model.embeddings.register_forward_hook(lambda m, args, kwargs, out: seen.update(kwargs),
                                                          with_kwargs=True)
        pooled = model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                                  token_type_ids=torch.zeros_like(tok["input_ids"])).pooler_output
        seen.clear()
        ours = model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.equal(seen["token_type_ids"], torch.zeros_like(tok["input_ids"]))
    assert torch.allclose(ours, torch.nn.functional.normalize(model.text_projection(pooled), dim=-1), atol=1e-6)


def test_clip_pools_the_eot_token_through_its_projection(clip_tok):
    model, tokenizer = tower_model("tiny-clip", clip_tok)
    tower = model.text_model
    assert type(tower).__name__ == "CLIPTextModelWithProjection"
    assert tower.text_projection.weight.shape == (64, 64) and model.text_projection.linear1.in_features == 64
    tok = tokenize(tokenizer, TEXTS, 77)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    eot = (ids == tokenizer.eos_token_id).int().argmax(-1)  # first EOT: the end of each text, before padding
    assert torch.equal(eot, mask.sum(1) - 1)
    with torch.no_grad():
        hidden = tower(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, 64), after ln_final
        expected = tower.text_projection(hidden[torch.arange(3), eot])
        ours = model.encode_text(ids, mask)
    assert torch.allclose(ours, torch.nn.functional.normalize(model.text_projection(expected), dim=-1), atol=1e-6)


@pytest.mark.parametrize("name, tok, last", [("tiny-bert", "bert_tok", "[SEP]"), ("tiny-clip", "clip_tok",
                                                                                  "<|endoftext|>")])
def test_tokenisation_truncates_at_77_and_keeps_the_end_token(name, tok, last, request):
    model, tokenizer = tower_model(name, request.getfixturevalue(tok))
    ids = tokenize(tokenizer, [LONG, "rain"], model.config.text.max_length)["input_ids"]
    assert model.config.text.max_length == 77 and ids.shape == (2, 77)
    assert ids[0, -1].item() == tokenizer.convert_tokens_to_ids(last)
    assert embed(model, tokenizer, [LONG]).shape == (1, 32)


@pytest.mark.parametrize("name, tok", [("tiny-bert", "bert_tok"), ("tiny-clip", "clip_tok")])
def test_own_format_round_trip(name, tok, request, tmp_path):
    model, tokenizer = tower_model(name, request.getfixturevalue(tok), seed=3)
    saved = save_own(model, tokenizer, tmp_path / "m")
    config = json.loads((saved / "config.json").read_text())["config"]["text"]
    assert config["model_type"] == model.config.text.model_type and (saved / "tokenizer.json").is_file()
    m = load_model(saved, device="cpu", precision="fp32")
    assert np.allclose(m.embed_text(TEXTS), embed(model, tokenizer, TEXTS).numpy(), atol=1e-6)
    assert type(m.model.text_model) is type(model.text_model)


@pytest.mark.parametrize("name, tok", [("tiny-bert", "bert_tok"), ("tiny-clip", "clip_tok")])
def test_text_only_builds_the_text_half_of_every_tower(name, tok, request, tmp_path, monkeypatch):
    """`load_model(..., text_only=True)` reads the text tensors alone into the tower transformers builds (any
    tower, CLIP text included, not only RoBERTa/BERT), with the whole model's embeddings; the audio weights
    are never read."""
    from clapcli.models import checkpoints

    model, tokenizer = tower_model(name, request.getfixturevalue(tok), seed=4)
    saved = save_own(model, tokenizer, tmp_path / "m")
    whole = load_model(saved, device="cpu", precision="fp32")
    read: list[str] = []
    real_read = checkpoints.read_safetensors

    def recording_read(path, prefixes=None):
        state = real_read(path, prefixes)
        read.extend(state)
        return state

    monkeypatch.setattr(checkpoints, "read_safetensors", recording_read)
    lean = load_model(saved, device="cpu", precision="fp32", text_only=True)
    assert lean.text_only and not whole.text_only and type(lean.model).__name__ == "ClapTextModel"
    assert read and not [k for k in read if k.startswith(("audio_model.", "audio_projection."))]
    assert type(lean.model.text_model) is type(whole.model.text_model)
    np.testing.assert_allclose(lean.embed_text(TEXTS), whole.embed_text(TEXTS), atol=1e-6)
    assert lean.identity_dict == whole.identity_dict


def test_any_encoder_directory_without_a_pooler_is_mean_pooled(bert_tok, tmp_path):
    """--text-model DIR with a DistilBERT (no pooler): weights loaded, masked mean pooling, recorded."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    tokenizer = AutoTokenizer.from_pretrained(str(bert_tok))
    torch.manual_seed(1)
    distil = DistilBertModel(DistilBertConfig(vocab_size=len(tokenizer), dim=48, n_layers=2, n_heads=2,
                                              hidden_dim=96, max_position_embeddings=80, pad_token_id=0)).eval()
    distil.save_pretrained(str(tmp_path / "distil"))
    tokenizer.save_pretrained(str(tmp_path / "distil"))
    model, tok = fresh_model("tiny", str(tmp_path / "distil"), None)
    model.eval()
    assert model.config.text.pooling == "mean" and model.config.text.hidden_size == 48
    assert all(torch.equal(v, distil.state_dict()[k]) for k, v in model.text_model.state_dict().items())
    batch = embed(model, tok, TEXTS)
    ids = tokenize(tok, TEXTS, 77)
    with torch.no_grad():
        hidden = distil(**ids).last_hidden_state
        mask = ids["attention_mask"][..., None].float()
        mean = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.allclose(batch, torch.nn.functional.normalize(model.text_projection(mean), dim=-1), atol=1e-5)
    assert torch.allclose(batch, torch.cat([embed(model, tok, [t]) for t in TEXTS]), atol=1e-5)
    m = load_model(save_own(model, tok, tmp_path / "saved"), device="cpu", precision="fp32")
    assert m.config.text.pooling == "mean" and np.allclose(m.embed_text(TEXTS), batch.numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def clip_dir(clip_tok, tmp_path_factory):
    """A tiny full CLIP model (text + vision) saved like openai/clip-vit-base-patch32, with its tokenizer."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(str(clip_tok))
    torch.manual_seed(2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                      eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                      pad_token_id=tokenizer.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=16),
                     projection_dim=40)
    d = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return d


def test_text_model_from_a_clip_checkpoint_takes_its_text_half_and_projection(clip_dir):
    from transformers import CLIPModel

    model, tokenizer = fresh_model("tiny", str(clip_dir), None)
    model.eval()
    ref = CLIPModel.from_pretrained(str(clip_dir)).eval()
    assert model.config.text.model_type == "clip_text_model" and model.config.text.pooling == "clip"
    assert model.config.text.projection_dim == 40 and model.text_projection.linear1.in_features == 40
    tok = tokenize(tokenizer, TEXTS, 77)
    with torch.no_grad():
        expected = ref.get_text_features(**tok)
        expected = getattr(expected, "pooler_output", expected)  # transformers 5 returns an output object
        ours = model.encode_text(tok["input_ids"], tok["attention_mask"])
    assert torch.allclose(ours, torch.nn.functional.normalize(model.text_projection(expected), dim=-1), atol=1e-5)


def test_train_with_a_clip_text_model_through_the_cli(clip_dir, tmp_path):
    from train_data import make_dataset

    manifest = make_dataset(tmp_path / "toy", per_kind=2)
    clap("shards", "make", manifest, "--out", tmp_path / "shards", "--shard-size", "8")
    run = tmp_path / "run"
    clap("train", "--data", tmp_path / "shards", "--out", run, "--model-config", "tiny", "--text-model", clip_dir,
         "--workers", "0", "--batch-size", "4", "--max-steps", "2", "--warmup", "1", "--log-every", "1")
    m = load_model(run / "final", device="cpu")
    assert m.config.text.model_type == "clip_text_model" and m.config.text.pooling == "clip"
    result = clap("embed", "--text", "a low hum", "--model", run / "final", "--json")
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert len(rows) == 1 and len(rows[0]["embedding"]) == 32
