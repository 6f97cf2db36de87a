"""The tagging library with hand-built embeddings: label sets, prompts, ensembling, scoring, cache, output."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from clapcli.cli.tag import write_json
from clapcli.errors import UsageError
from clapcli.tagging import (
    DEFAULT_TEMPLATE,
    FileTags,
    LabelScore,
    LabelSet,
    LabelSetError,
    Scorer,
    TemplateError,
    WindowTags,
    ZeroShotScorer,
    builtin_labelsets,
    cached_label_embeddings,
    label_embeddings,
    render,
    resolve_labels,
    score,
    select,
    tag_files,
    top_k,
)
from clapcli.tagging.cache import label_cache_dir


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# ---------------------------------------------------------------- label sets


def test_builtin_labelsets_have_their_dataset_sizes():
    assert builtin_labelsets() == {"esc50": 50, "urbansound8k": 10, "audioset": 527, "fsd50k": 200, "vggsound": 309}


@pytest.mark.parametrize("name", ["esc50", "urbansound8k", "audioset", "fsd50k", "vggsound"])
def test_builtin_labelset_resolves_in_class_index_order(name):
    labelset = resolve_labels(name)
    assert labelset.name == name
    assert len(labelset) == builtin_labelsets()[name]
    assert len(set(labelset.labels)) == len(labelset)
    first = {"esc50": "dog", "urbansound8k": "air conditioner", "audioset": "Speech",
             "fsd50k": "Accelerating, revving, vroom", "vggsound": "air conditioning noise"}
    assert labelset.labels[0] == first[name]


def test_builtin_name_is_case_insensitive():
    assert resolve_labels("ESC50").labels == resolve_labels("esc50").labels


def test_audioset_keeps_commas_inside_labels():
    assert resolve_labels("audioset").labels[1] == "Male speech, man speaking"


def test_comma_list_strips_spaces():
    labelset = resolve_labels(" dog, rain ,siren ")
    assert labelset.labels == ["dog", "rain", "siren"]
    assert labelset.name == "custom"


def test_label_file_ignores_blank_lines_and_comments(tmp_path):
    path = tmp_path / "kitchen.txt"
    path.write_text("# my kitchen sounds\n\nkettle whistling\n  frying pan  \n# end\nfridge hum\n", encoding="utf-8")
    labelset = resolve_labels(f"@{path}")
    assert labelset.labels == ["kettle whistling", "frying pan", "fridge hum"]
    assert labelset.name == "kitchen"


def test_label_file_duplicate_names_both_lines(tmp_path):
    path = tmp_path / "dups.txt"
    path.write_text("dog\ncat\n\ndog\n", encoding="utf-8")
    with pytest.raises(LabelSetError, match=r"duplicate labels: 'dog' \(.*dups.txt:1 and .*dups.txt:4\)"):
        resolve_labels(f"@{path}")


def test_missing_or_empty_label_file_is_a_clear_error(tmp_path):
    with pytest.raises(LabelSetError, match="label file not found"):
        resolve_labels(f"@{tmp_path / 'nope.txt'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(LabelSetError, match="has no labels"):
        resolve_labels(f"@{empty}")


def test_unknown_name_lists_the_builtin_sets():
    with pytest.raises(UsageError) as info:
        resolve_labels("esc-50")
    message = str(info.value)
    assert "unknown label set 'esc-50'" in message
    for name, size in builtin_labelsets().items():
        assert f"{name} ({size})" in message
    assert info.value.exit_code == 2


@pytest.mark.parametrize("spec, match", [("dog,,rain", "empty label"), ("dog,rain,", "empty label"),
                                         ("dog,rain,dog", "duplicate labels: 'dog'"), ("  ", "no labels")])
def test_comma_list_rejects_empties_and_duplicates(spec, match):
    with pytest.raises(LabelSetError, match=match):
        resolve_labels(spec)


def test_labelset_constructor_validates_and_hashes_content():
    with pytest.raises(LabelSetError):
        LabelSet("x", ["a", "a"])
    with pytest.raises(LabelSetError):
        LabelSet("x", [])
    # The name does not change the hash (same labels → same text embeddings); order does.
    assert LabelSet("x", ["a", "b"]).content_hash == LabelSet("y", ["a", "b"]).content_hash
    assert LabelSet("x", ["a", "b"]).content_hash != LabelSet("x", ["b", "a"]).content_hash


# ---------------------------------------------------------------- prompts


def test_render_is_template_major():
    prompts = render(["a {}.", "the {} sound"], ["dog", "rain"])
    assert prompts == ["a dog.", "a rain.", "the dog sound", "the rain sound"]


def test_render_defaults_to_the_paper_template_and_keeps_other_braces():
    assert DEFAULT_TEMPLATE == "This is a sound of {}."
    assert render([], ["dog"]) == ["This is a sound of dog."]
    assert render(["{} {{not a slot}}"], ["x{}y"]) == ["x{}y {{not a slot}}"]


@pytest.mark.parametrize("template", ["no slot", "{} and {}", "{label}"])
def test_render_rejects_templates_without_exactly_one_slot(template):
    with pytest.raises(TemplateError, match="exactly one"):
        render([template], ["dog"])


# ---------------------------------------------------------------- ensembling and scoring


def test_ensemble_equals_hand_computed_average():
    rng = np.random.default_rng(0)
    n_templates, n_labels, dim = 3, 4, 8
    # Unnormalised rows with very different norms: per-prompt normalisation must happen before the mean.
    text = rng.normal(size=(n_templates * n_labels, dim)) * rng.uniform(0.1, 10, size=(n_templates * n_labels, 1))
    got = label_embeddings(text.astype(np.float32), n_templates, n_labels)
    for label in range(n_labels):
        rows = [text[t * n_labels + label] for t in range(n_templates)]
        mean = sum(r / np.linalg.norm(r) for r in rows) / n_templates
        np.testing.assert_allclose(got[label], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-6)


def test_ensemble_rejects_a_shape_that_does_not_match():
    with pytest.raises(ValueError):
        label_embeddings(np.zeros((5, 4), dtype=np.float32), 2, 3)


def test_probabilities_sum_to_one_per_file():
    rng = np.random.default_rng(1)
    scores = score(rng.normal(size=(6, 16)), rng.normal(size=(527, 16)), logit_scale=100.0)
    assert scores.probs.shape == scores.cosine.shape == (6, 527)
    np.testing.assert_allclose(scores.probs.sum(axis=1), 1.0, rtol=1e-5)
    assert (scores.probs >= 0).all()
    assert np.abs(scores.cosine).max() <= 1.0 + 1e-6


def test_label_equal_to_the_audio_embedding_ranks_first_with_hand_computed_probability():
    rng = np.random.default_rng(2)
    dim, logit_scale = 12, 30.0
    label_emb = unit(rng.normal(size=(5, dim)))
    audio = label_emb[3] * 2.5  # same direction as label 3, not normalised
    scores = score(audio[None, :], label_emb, logit_scale)
    cosine = label_emb @ unit(audio)  # hand computation
    expected = np.exp(logit_scale * cosine) / np.exp(logit_scale * cosine).sum()
    np.testing.assert_allclose(scores.cosine[0], cosine, atol=1e-6)
    np.testing.assert_allclose(scores.probs[0], expected, rtol=1e-5)
    assert scores.cosine[0, 3] == pytest.approx(1.0, abs=1e-6)
    ranked = top_k(scores, 5)[0]
    assert ranked[0].index == 3
    assert ranked[0].prob == pytest.approx(scores.probs[0].max())
    assert [r.prob for r in ranked] == sorted((r.prob for r in ranked), reverse=True)


def test_large_logit_scale_does_not_overflow():
    label_emb = unit(np.eye(3))
    scores = score(label_emb[:1], label_emb, logit_scale=1e4)
    assert np.isfinite(scores.probs).all()
    assert scores.probs[0, 0] == pytest.approx(1.0)


def test_top_k_limits_and_orders_each_row():
    rng = np.random.default_rng(3)
    scores = score(rng.normal(size=(4, 8)), rng.normal(size=(10, 8)), 50.0)
    for i, row in enumerate(top_k(scores, 3)):
        assert len(row) == 3
        assert [r.index for r in row] == list(np.argsort(-scores.probs[i])[:3])
        assert row[0].cosine == pytest.approx(float(scores.cosine[i].max()))
    assert len(top_k(scores, None)[0]) == 10


def test_single_label_threshold_is_on_probability():
    label_emb = unit(np.eye(4))
    audio = unit([[1.0, 0.9, 0.0, 0.0]])
    scores = score(audio, label_emb, 10.0)
    kept = select(scores, k=4, threshold=0.2)[0]
    assert [r.index for r in kept] == [0, 1]  # the other two have tiny probabilities
    assert all(r.prob >= 0.2 for r in kept)


def test_multi_label_keeps_every_label_above_the_cosine_threshold_independently_of_the_set():
    # Audio halfway between "dog" (0) and "rain" (1): both apply.
    label_emb = unit(np.eye(4))
    audio = unit([[1.0, 1.0, 0.1, 0.0]])
    chosen = select(score(audio, label_emb, 100.0), multi_label=True, threshold=0.5)[0]
    assert sorted(r.index for r in chosen) == [0, 1]
    # Adding a near-duplicate of "dog" changes the softmax probabilities but not the multi-label decision
    # for "rain": the rule is per label.
    bigger = np.vstack([label_emb, unit([0.99, 0.0, 0.1, 0.0])])
    chosen_bigger = select(score(audio, bigger, 100.0), multi_label=True, threshold=0.5)[0]
    assert sorted(r.index for r in chosen_bigger) == [0, 1, 4]
    assert all(r.cosine >= 0.5 for r in chosen_bigger)
    assert select(score(audio, bigger, 100.0), k=2, multi_label=True, threshold=0.5)[0] == chosen_bigger[:2]


def test_multi_label_needs_a_threshold_and_k_must_be_positive():
    scores = score(unit(np.eye(2))[:1], unit(np.eye(2)), 10.0)
    with pytest.raises(UsageError, match="threshold"):
        select(scores, multi_label=True)
    with pytest.raises(UsageError, match="at least 1"):
        select(scores, k=0)


def test_zero_shot_scorer_is_a_scorer():
    scorer = ZeroShotScorer(["dog", "rain"], unit(np.eye(2)) * 3, logit_scale=20.0)
    assert isinstance(scorer, Scorer)
    scores = scorer(np.array([0.0, 5.0]))
    assert scores.probs.shape == (1, 2)
    assert top_k(scores, 1)[0][0].index == 1
    with pytest.raises(ValueError):
        ZeroShotScorer(["dog"], unit(np.eye(2)), 20.0)


# ---------------------------------------------------------------- label-embedding cache


class CountingTextEmbedder:
    """Deterministic text embeddings (a hash-seeded vector per text) that count text-tower calls."""

    def __init__(self, fingerprint="0123456789abcdef", dim=16):
        self.fingerprint = fingerprint
        self.dim = dim
        self.calls = 0
        self.texts_seen = 0

    def embed_text(self, texts):
        self.calls += 1
        self.texts_seen += len(texts)
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            rows.append(np.random.default_rng(seed).normal(size=self.dim))
        return unit(np.stack(rows)).astype(np.float32)


def test_cache_hit_makes_no_text_tower_call():
    model = CountingTextEmbedder()
    labelset = resolve_labels("esc50")
    templates = ["This is a sound of {}.", "the sound of {}"]
    first = cached_label_embeddings(model, labelset, templates)
    assert model.calls == 1 and model.texts_seen == 2 * 50
    expected = label_embeddings(model.embed_text(render(templates, labelset.labels)), 2, 50)
    model.calls = 0
    np.testing.assert_allclose(first, expected, rtol=1e-6)

    second = cached_label_embeddings(model, labelset, templates)
    assert model.calls == 0
    np.testing.assert_array_equal(first, second)
    entries = sorted(p.suffix for p in label_cache_dir().iterdir())
    assert entries == [".json", ".npy"]
    assert label_cache_dir() == Path(os.environ["CLAP_HOME"]) / "label-cache"
    sidecar = json.loads(next(label_cache_dir().glob("*.json")).read_text())
    assert sidecar["key"]["model_fingerprint"] == "0123456789abcdef" and sidecar["key"]["templates"] == templates


def test_cache_is_invalidated_when_templates_labels_or_model_change():
    model = CountingTextEmbedder()
    cached_label_embeddings(model, LabelSet("a", ["dog", "rain"]), None)
    assert model.calls == 1
    cached_label_embeddings(model, LabelSet("a", ["dog", "rain"]), ["the sound of {}"])
    assert model.calls == 2
    cached_label_embeddings(model, LabelSet("a", ["dog", "rain", "siren"]), None)
    assert model.calls == 3
    cached_label_embeddings(CountingTextEmbedder(fingerprint="fedcba9876543210"), LabelSet("a", ["dog", "rain"]), None)
    assert model.calls == 3
    # Same labels under another name, and the default template spelled out: both hit the first entry.
    cached_label_embeddings(model, LabelSet("b", ["dog", "rain"]), [DEFAULT_TEMPLATE])
    assert model.calls == 3
    assert len(list(label_cache_dir().glob("*.npy"))) == 4


def test_corrupt_cache_entry_is_recomputed(tmp_path):
    model = CountingTextEmbedder()
    labelset = LabelSet("a", ["dog", "rain"])
    good = cached_label_embeddings(model, labelset, None, cache_dir=tmp_path)
    (npy,) = tmp_path.glob("*.npy")
    npy.write_bytes(b"not an npy file")
    again = cached_label_embeddings(model, labelset, None, cache_dir=tmp_path)
    assert model.calls == 2
    np.testing.assert_array_equal(good, again)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files behind
    cached_label_embeddings(model, labelset, None, cache_dir=tmp_path)
    assert model.calls == 2


# ---------------------------------------------------------------- tag_files with hand-built embeddings


@dataclass
class Segment:
    start: float
    end: float
    embedding: np.ndarray


@dataclass
class AudioEmbedding:
    path: str
    duration: float
    embedding: np.ndarray
    segments: list = field(default_factory=list)
    error: str | None = None


class HandBuiltModel(CountingTextEmbedder):
    """Text embeddings from the hash rule above; audio embeddings given per file name by the test."""

    logit_scale = 50.0

    def __init__(self, audio):
        super().__init__()
        self.audio = audio  # file name → AudioEmbedding or an error string
        self.embed_files_calls = []

    def embed_files(self, paths, batch_size=8, segments=True, on_error=None, progress=None):
        self.embed_files_calls.append((list(paths), batch_size, segments))
        for path in paths:
            entry = self.audio[path.rsplit("/", 1)[-1]]
            if isinstance(entry, str):
                yield AudioEmbedding(path, 0.0, None, [], entry)  # like Clap.embed_files: the reason, path-free
            else:
                yield AudioEmbedding(path, entry.duration, entry.embedding, entry.segments if segments else [])


@dataclass
class TaggedStreet:
    """One tag_files run over a short, a missing, a broken and a long file, and what it reported."""

    model: HandBuiltModel
    labelset: LabelSet
    paths: list
    results: list
    errors: list
    progressed: list


@pytest.fixture
def tagged_street(tmp_path):
    labelset = LabelSet("street", ["dog", "rain", "siren", "engine"])
    text = CountingTextEmbedder()
    label_emb = label_embeddings(text.embed_text(render([DEFAULT_TEMPLATE], labelset.labels)), 1, 4)
    long_segments = [Segment(0.0, 10.0, label_emb[0]), Segment(10.0, 20.0, label_emb[1]),
                     Segment(15.0, 25.0, label_emb[2])]
    model = HandBuiltModel({
        "short.wav": AudioEmbedding("", 4.0, label_emb[2]),
        "long.wav": AudioEmbedding("", 25.0, unit(label_emb[0] + label_emb[1]), long_segments),
        "broken.wav": "not a sound file (unrecognised header)",
    })
    for name in ("short.wav", "long.wav", "broken.wav"):
        (tmp_path / name).write_bytes(b"")
    paths = [tmp_path / "short.wav", tmp_path / "missing.wav", tmp_path / "broken.wav", tmp_path / "long.wav"]
    errors, progressed = [], []
    results = list(tag_files(model, paths, labelset, None, top_k=2, timeline=True, batch_size=4,
                             on_progress=progressed.append, on_error=lambda p, e: errors.append((p, e))))
    return TaggedStreet(model, labelset, paths, results, errors, progressed)


def test_tag_files_keeps_input_order_with_failures_in_place_and_reports_each_result(tagged_street):
    results, paths, progressed = tagged_street.results, tagged_street.paths, tagged_street.progressed
    assert [r.path for r in results] == [str(p) for p in paths]  # input order, failures in place
    assert progressed == results


def test_tag_files_ranks_a_short_file_top_k_without_a_timeline(tagged_street):
    short = tagged_street.results[0]
    assert short.error is None and short.labels[0].label == "siren" and len(short.labels) == 2
    assert short.labels[0].cosine == pytest.approx(1.0, abs=1e-5)
    assert short.timeline == []  # ≤ 10 s: no windows beside the file-level labels


def test_tag_files_reports_missing_and_unreadable_files_without_their_path(tagged_street):
    paths, errors = tagged_street.paths, tagged_street.errors
    _, missing, broken, _ = tagged_street.results
    assert missing.error == "no such file" and missing.labels == []
    assert broken.error == "not a sound file (unrecognised header)"  # the path is in FileTags.path already
    assert broken.duration is None
    assert [e[0] for e in errors] == [str(paths[1]), str(paths[2])]


def test_tag_files_builds_a_timeline_of_windows_for_a_long_file(tagged_street):
    long = tagged_street.results[3]
    assert {s.label for s in long.labels} == {"dog", "rain"}
    assert [(w.start, w.end, w.labels[0].label) for w in long.timeline] == [
        (0.0, 10.0, "dog"), (10.0, 20.0, "rain"), (15.0, 25.0, "siren")]


def test_tag_files_encodes_labels_once_and_embeds_only_the_readable_files_with_segments(tagged_street):
    model, paths = tagged_street.model, tagged_street.paths
    assert model.calls == 1
    assert model.embed_files_calls == [([str(paths[0]), str(paths[2]), str(paths[3])], 4, True)]


def test_tag_files_again_hits_the_label_cache_and_asks_for_no_segments_without_timeline(tagged_street):
    model = tagged_street.model
    again = list(tag_files(model, tagged_street.paths[:1], tagged_street.labelset, None, timeline=False))
    assert model.calls == 1  # cache hit
    assert again[0].timeline is None and model.embed_files_calls[-1][2] is False


# ---------------------------------------------------------------- JSON lines


def _sample_results():
    ok = FileTags("a b.wav", 25.0, [LabelScore("dog", 0.75, 0.31), LabelScore("rain, heavy", 0.25, 0.2)],
                  [WindowTags(0.0, 10.0, [LabelScore("dog", 0.9, 0.33)]),
                   WindowTags(10.0, 20.0, [LabelScore("rain, heavy", 0.6, 0.25)]),
                   WindowTags(15.0, 25.0, [LabelScore("dog", 0.55, 0.29)])])
    plain = FileTags("c.wav", 3.5, [LabelScore("siren", 1.0, 0.5)])
    failed = FileTags("bad.wav", None, [], None, "no such file")
    return ok, plain, failed


def test_json_lines_parse_with_stable_keys():
    stream = io.StringIO()
    for result in _sample_results():
        write_json(result, stream)
    ok, plain, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(ok) == ["path", "duration", "labels", "timeline"]
    assert ok["labels"][0] == {"label": "dog", "prob": 0.75, "cosine": 0.31}
    assert ok["timeline"][1] == {"start": 10.0, "end": 20.0, "labels": [{"label": "rain, heavy", "prob": 0.6,
                                                                         "cosine": 0.25}]}
    assert list(plain) == ["path", "duration", "labels"]  # no timeline unless asked, no error unless failed
    assert failed == {"path": "bad.wav", "duration": None, "labels": [], "error": "no such file"}


# ---------------------------------------------------------------- one model fingerprint


def test_fingerprint_ignores_where_the_model_was_loaded_from(tiny_model_dir, tiny_unfused_dir, tmp_path):
    import shutil

    from clapcli.engine.load import load_model
    from clapcli.identity import fingerprint, same_model

    copy = shutil.copytree(tiny_model_dir, tmp_path / "moved" / "model")
    here, there = load_model(tiny_model_dir, device="cpu"), load_model(copy, device="cpu")
    assert here.identity_dict["model"] != there.identity_dict["model"]
    assert here.fingerprint == there.fingerprint == fingerprint(here.identity_dict)
    assert same_model(here.identity_dict, there.identity_dict)
    assert set(here.identity_dict) == {"model", "weights", "frontend", "fused", "dim"}  # the index's format
    other = load_model(tiny_unfused_dir, device="cpu")
    assert other.fingerprint != here.fingerprint and not same_model(other.identity_dict, here.identity_dict)


def test_a_moved_model_hits_the_label_cache(tiny_model_dir, tmp_path, monkeypatch):
    import shutil

    import soundfile
    from typer.testing import CliRunner

    import clapcli.engine.load
    from clapcli.cli.main import app

    clip = tmp_path / "beep.wav"
    soundfile.write(clip, (0.3 * np.sin(2 * np.pi * 440 * np.arange(48_000) / 48_000)).astype(np.float32), 48_000)
    copy = shutil.copytree(tiny_model_dir, tmp_path / "elsewhere" / "model")
    text_calls = []
    real_load_model = clapcli.engine.load.load_model

    def counting_load_model(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        real_embed_text = model.embed_text
        model.embed_text = lambda texts, *a, **k: (text_calls.append(len(texts)), real_embed_text(texts, *a, **k))[1]
        return model

    monkeypatch.setattr(clapcli.engine.load, "load_model", counting_load_model)

    def tag(model_dir):
        result = CliRunner().invoke(app, ["tag", str(clip), "--labels", "dog,rain,siren", "--json",
                                          "--model", str(model_dir), "--device", "cpu"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = tag(tiny_model_dir)
    assert text_calls == [3]
    second = tag(copy)
    assert text_calls == [3]  # the copy's label embeddings came from the cache: no text-tower call
    assert second == first
    assert len(list(label_cache_dir().glob("*.npy"))) == 1
