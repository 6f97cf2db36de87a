"""Captions from tags: the AudioSet template, the de-biasing table, keyword-to-caption end to end."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from audio_synth import tone_noise, write_audio
from clapcli.cli.main import app
from clapcli.errors import UsageError, WeightsNotAvailable
from clapcli.data.captions import DEBIAS_TABLE, KeywordToCaption, debias, template_caption
from clapcli.data.shard_writer import make_shards
from clapcli.data.shards import iter_shard, resolve_split, select_text


def test_template_caption_follows_audioset():
    assert template_caption(["Dog"]) == "The sound of Dog"
    assert template_caption(["Dog", "Bark"]) == "The sounds of Dog and Bark"
    assert template_caption(["rain", "thunder", "wind"]) == "The sounds of rain, thunder and wind"  # no Oxford comma
    assert template_caption([" rain ", "", "wind"]) == "The sounds of rain and wind"
    with pytest.raises(ValueError):
        template_caption([])


@pytest.mark.parametrize("text, expected", [
    ("a man speaks to a woman", "a person speaks to a person"),
    ("Man talking", "Person talking"),
    ("MAN SHOUTING", "PERSON SHOUTING"),
    ("women and men laugh", "people and people laugh"),
    ("a girl and a boy play with her dog and his cat", "a person and a person play with their dog and their cat"),
    ("She says he told him the book is hers", "They says they told them the book is theirs"),
    ("the lady hums to herself; the gentleman to himself",
     "the person hums to themself; the person to themself"),
    ("a manual typewriter, human voices, a woman's laugh", "a manual typewriter, human voices, a person's laugh"),
    ("shepherd, mankind, manhole, hero, sheep, other", "shepherd, mankind, manhole, hero, sheep, other"),
    ("female speech, male choir", "female speech, male choir"),
    ("engine idling", "engine idling"),
])
def test_debias_table_on_fixed_strings(text, expected):
    assert debias(text) == expected


def test_debias_table_maps_every_entry_and_is_idempotent():
    for word, neutral in DEBIAS_TABLE.items():
        assert debias(f"x {word} y") == f"x {neutral} y"
        assert debias(f"{word.capitalize()}!") == f"{neutral.capitalize()}!"
        assert debias(debias(word)) == neutral


def _tiny_k2c(directory) -> str:
    """A random 1-layer T5 with the byte-level ByT5 tokenizer, saved offline; its LM head only writes letters,
    so greedy decoding gives a non-empty caption that depends on the keywords."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                   num_heads=2, tie_word_embeddings=False, decoder_start_token_id=tok.pad_token_id,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = T5ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        letters = [b + 3 for b in b"abcdefghijklmnopqrstuvwxyz "]  # ByT5 ids are byte + 3
        model.lm_head.weight[letters] = torch.randn(len(letters), cfg.d_model) * 5
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def test_k2c_end_to_end_through_shards_make(tmp_path):
    k2c_dir = _tiny_k2c(tmp_path / "k2c")
    audio = tmp_path / "audio"
    audio.mkdir()
    rows = [  # (file, seconds, caption, tags)
        ("long.wav", 2.5, "", ["rain", "thunder"]),
        ("short.wav", 1.0, "", ["dog", "bark"]),
        ("captioned.wav", 2.2, "a car passes by", ["car"]),
        ("plain.wav", 2.1, "wind in trees", None),
    ]
    for i, (name, seconds, _, _) in enumerate(rows):
        write_audio(audio / name, tone_noise(seconds, 48_000, seed=i), 48_000)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "caption", "tags"])
        for name, _, caption, tags in rows:
            w.writerow([f"audio/{name}", caption, json.dumps(tags) if tags else ""])

    res = CliRunner().invoke(app, ["shards", "make", str(tmp_path / "m.csv"), "--out", str(tmp_path / "s"),
                                   "--captions-from-tags", "k2c", "--k2c-model", k2c_dir, "--k2c-batch-size", "1",
                                   "--device", "cpu", "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 4 and summary["k2c_captions"] == 2

    meta = [r.meta for url in resolve_split(tmp_path / "s").urls for r in iter_shard(url)]
    k2c = KeywordToCaption(k2c_dir, device="cpu")
    expected = [debias(c) for c in k2c.generate([["rain", "thunder"], ["car"]])]
    assert all(e.strip() and not e.startswith("The sound") for e in expected) and expected[0] != expected[1]

    long, short, captioned, plain = meta
    assert long["text"] == "The sounds of rain and thunder" and long["tag"] == ["rain", "thunder"]
    assert long["text_augment_t5"] == expected[0]
    assert long["text_augment_all"] == [long["text"], expected[0]]
    assert short["text_augment_t5"] == short["text"] == "The sounds of dog and bark"  # under 2 s: template
    assert captioned["text"] == "a car passes by" and captioned["text_augment_t5"] == expected[1]
    assert captioned["text_augment_all"] == ["a car passes by", expected[1]]
    assert "text_augment_t5" not in plain and select_text(plain, "k2c") == ["wind in trees"]
    assert select_text(long, "k2c") == [expected[0]]


def test_k2c_batches_give_the_same_captions_and_report_progress(tmp_path):
    k2c_dir = _tiny_k2c(tmp_path / "k2c")
    tags = [["rain"], ["dog", "bark"], ["a", "b", "c"]]
    seen = []
    one = KeywordToCaption(k2c_dir, device="cpu", batch_size=1).generate(tags, progress=seen.append)
    three = KeywordToCaption(k2c_dir, device="cpu", batch_size=3).generate(tags)
    assert one == three and seen == [1, 1, 1]


def test_k2c_model_not_available_is_one_line(tmp_path):
    with pytest.raises(WeightsNotAvailable) as exc:
        KeywordToCaption(str(tmp_path / "no-such-model"), device="cpu")
    assert "--k2c-model" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(WeightsNotAvailable):
        KeywordToCaption("nobody/no-such-k2c-model", device="cpu")  # HF_HUB_OFFLINE=1 in the tests


def test_k2c_options_must_go_together(tmp_path):
    (tmp_path / "m.csv").write_text("path,tags\nx.wav,dog\n")
    with pytest.raises(UsageError, match="needs --k2c-model"):
        make_shards(tmp_path / "m.csv", tmp_path / "out", captions_from_tags="k2c")
    with pytest.raises(UsageError, match="only with --captions-from-tags k2c"):
        make_shards(tmp_path / "m.csv", tmp_path / "out", captions_from_tags="template", k2c_model="t5")
    assert not (tmp_path / "out").exists()
