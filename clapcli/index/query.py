"""A query as the search box reads it (`clap search`, `clap serve`, `clap mcp`), and the cheapest model that
answers it: the saved torch-free text-query graph where it gives the model's own vectors."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import UsageError
from ..identity import same_model
from ..models.onnx_text import load_text_query
from .scan import AUDIO_EXTENSIONS


@dataclass
class Query:
    """A search as `clap search` read it from its arguments: the texts and audio files that add up, and the texts
    and audio files pushed away (`--json`'s "query")."""

    text: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    audio: list[str] = field(default_factory=list)
    not_audio: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "not": self.negative, "audio": self.audio, "not_audio": self.not_audio}


def read_query(words: list[str], negative: list[str], audio: list[str], not_audio: list[str] = ()) -> Query:
    """The words after `clap search` → one query, as a search box reads them: `metal impact` is the text "metal
    impact". A lone `+` starts another query that adds up, a lone `-` one that is pushed away (as `--not`); a
    query that names an existing audio file searches by example (as `--audio`), or pushes its sound away after a
    `-` (as `--not-audio`). Refuses empty queries."""
    read = Query(negative=[], audio=list(audio), not_audio=list(not_audio))
    groups: list[tuple[str, list[str]]] = [("+", [])]
    for word in words:
        if word in ("+", "-"):
            groups.append((word, []))
        else:
            groups[-1][1].append(word)
    for sign, group in groups:
        text = " ".join(group)
        if not text.strip():
            if len(groups) > 1:
                raise UsageError("a lone + or - joins two queries: give words on each side, as in "
                                 "`metal impact + glass` or `rain - thunder`")
            if words:
                raise UsageError("empty query: give words to search for (or --audio FILE)")
            continue
        if sign == "-":
            (read.not_audio if _is_audio_file(text, AUDIO_EXTENSIONS) else read.negative).append(text)
        elif _is_audio_file(text, AUDIO_EXTENSIONS):
            read.audio.append(text)
        else:
            read.text.append(text)
    for text in negative:
        if not text.strip():
            raise UsageError("empty --not: give the words whose results to push away")
        read.negative.append(text)
    return read


def _is_audio_file(text: str, extensions) -> bool:
    return os.path.splitext(text)[1][1:].lower() in extensions and os.path.isfile(text)


def torch_free_query(ref, audio, device, precision, tokenizer, engine):
    """The model's saved text-query graph (`clapcli.models.onnx_text`, written by `clap index`) when this is a
    plain text query that it answers exactly like the model: fp32 on the CPU, no --tokenizer, engine not torch.
    None otherwise, and where no graph was saved: the caller loads the model."""
    plain_text = not audio and not tokenizer and ref is not None
    fp32_cpu = (precision or "auto").lower() in ("auto", "fp32") and (device or "auto").lower() in ("auto", "cpu")
    if not (plain_text and fp32_cpu) or (engine or "auto").lower() not in ("auto", "onnx"):  # --engine/$CLAP_ENGINE
        return None
    return load_text_query(ref)


def text_query_model(ref, identity: dict | None, device: str | None = "auto", precision: str | None = "auto",
                     tokenizer: str | None = None, engine: str | None = None, load=None):
    """The model that embeds text queries for an index built with `identity` (`clap search`, `clap serve`, `clap
    mcp`): the saved torch-free graph where it answers exactly as that model, else the model's text half, loaded
    by `load` (`engine.load.load_model`'s signature; the CLI passes its own). A graph saved under other settings is
    passed over: the loaded model decides (and a caller's identity check explains a real mismatch)."""
    model = torch_free_query(ref, [], device, precision, tokenizer, engine)
    if model is not None and identity and not same_model(identity, model.identity_dict):
        model = None
    if model is None:
        if load is None:
            from ..engine.load import load_model as load
        model = load(ref, device or "auto", precision or "auto", tokenizer, text_only=True, engine=engine)
    return model
