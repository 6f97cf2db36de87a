"""Captions from tags: the AudioSet template, keyword-to-caption (K2C) with a seq2seq model, de-biasing.

LAION-CLAP turns tag lists into sentences two ways (reference/laion_clap.md §7):

- the template of its AudioSet preprocessing, "The sound of a" for one tag and "The sounds of a, b and c"
  for several (no Oxford comma, no period);
- keyword-to-caption: a T5 model fine-tuned on CommonGen writes a sentence from the keywords, and a word
  table then replaces gendered words with neutral ones. LAION never published its full table; ours is
  `DEBIAS_TABLE`, applied on word boundaries with the case of each word kept.

Clips shorter than `K2C_MIN_SECONDS` keep the template caption, as the LAION-Audio-630K data card does.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

# Clips shorter than this (seconds) get the template caption instead of a K2C one (LAION data card).
K2C_MIN_SECONDS = 2.0

# Longest generated caption, in tokens of the K2C model.
K2C_MAX_NEW_TOKENS = 48


def template_caption(tags: Sequence[str]) -> str:
    """AudioSet's template: "The sound of a" / "The sounds of a, b and c" (no Oxford comma, no period)."""
    names = [str(t).strip() for t in tags if str(t).strip()]
    if not names:
        raise ValueError("template_caption needs at least one non-empty tag")
    if len(names) == 1:
        return "The sound of " + names[0]
    return "The sounds of " + ", ".join(names[:-1]) + " and " + names[-1]


# Gendered word -> neutral word, in lower case. Matched as whole words (so "manual", "human", "womanly" and
# "shepherd" are untouched), case-insensitively, with the case of the original word kept. Adjectives such
# as "female"/"male" are left alone: "female speech" describes the sound, and "person speech" is not English.
# "her" maps to "their" although it is sometimes an object ("saw her" -> "saw them"): the possessive is the
# common case in captions, and LAION's published rule is the same ("her/his -> their").
DEBIAS_TABLE: dict[str, str] = {
    "woman": "person",
    "man": "person",
    "girl": "person",
    "boy": "person",
    "lady": "person",
    "gentleman": "person",
    "women": "people",
    "men": "people",
    "girls": "people",
    "boys": "people",
    "ladies": "people",
    "gentlemen": "people",
    "her": "their",
    "his": "their",
    "hers": "theirs",
    "she": "they",
    "he": "they",
    "him": "them",
    "herself": "themself",
    "himself": "themself",
    "mother": "parent",
    "father": "parent",
    "mothers": "parents",
    "fathers": "parents",
    "daughter": "child",
    "son": "child",
    "daughters": "children",
    "sons": "children",
    "sister": "sibling",
    "brother": "sibling",
    "sisters": "siblings",
    "brothers": "siblings",
    "wife": "spouse",
    "husband": "spouse",
    "wives": "spouses",
    "husbands": "spouses",
}

_DEBIAS_RE = re.compile(r"\b(" + "|".join(sorted(DEBIAS_TABLE, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _keep_case(original: str, replacement: str) -> str:
    if original.isupper() and len(original) > 1:
        return replacement.upper()
    if original[0].isupper():
        return replacement[0].upper() + replacement[1:]
    return replacement


def debias(text: str) -> str:
    """Replace every gendered word of `DEBIAS_TABLE` by its neutral form: "A Man and HIS dog" -> "A Person and
    THEIR dog". Whole words only ("manual", "human", "shepherd" stay), case kept (Man -> Person, MAN -> PERSON)."""
    return _DEBIAS_RE.sub(lambda m: _keep_case(m.group(0), DEBIAS_TABLE[m.group(0).lower()]), text)


class KeywordToCaption:
    """Sentences from tag lists with a seq2seq model (LAION used `mrm8488/t5-base-finetuned-common_gen`).

    `model` is a local directory or a hub id, loaded through transformers' `AutoModelForSeq2SeqLM` and
    `AutoTokenizer` (the Hugging Face cache and HF_HUB_OFFLINE are honoured). A model that is neither a
    directory nor cached, with no network, is a one-line `WeightsNotAvailable`. The input of each item is
    its keywords joined by spaces (CommonGen's format); decoding is greedy, so the captions are reproducible.
    The output is NOT de-biased: call `debias` on it (`caption_tags` below does both).
    """

    def __init__(self, model: str, device: str = "auto", batch_size: int = 16):
        from ..errors import WeightsNotAvailable, first_line
        from ..models.pretrained import from_pretrained
        from ..runtime import resolve_device

        try:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = from_pretrained(AutoModelForSeq2SeqLM, model, "--k2c-model")
        except (OSError, ValueError) as exc:
            raise WeightsNotAvailable(
                f"keyword-to-caption model {model!r} is not available here: give a local model directory "
                f"to --k2c-model, or run once with network access to cache it ({first_line(exc)})"
            ) from exc
        self.device = resolve_device(device)
        self.model.to(self.device).eval()
        self.batch_size = max(1, int(batch_size))
        self.name = str(model)

    def generate(self, keyword_lists: Sequence[Sequence[str]], progress: Callable[[int], None] | None = None
                 ) -> list[str]:
        """One caption per keyword list, in order; `progress(n)` is called after each batch of n items."""
        import torch

        captions: list[str] = []
        for start in range(0, len(keyword_lists), self.batch_size):
            batch = [" ".join(str(k).strip() for k in kws) for kws in keyword_lists[start:start + self.batch_size]]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=128)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=K2C_MAX_NEW_TOKENS, num_beams=1, do_sample=False)
            texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
            captions.extend(" ".join(t.split()) for t in texts)
            if progress is not None:
                progress(len(batch))
        return captions

    def caption_tags(self, keyword_lists: Sequence[Sequence[str]],
                     progress: Callable[[int], None] | None = None) -> list[str]:
        """`generate` then `debias`; an empty generation falls back to the template caption."""
        raw = self.generate(keyword_lists, progress)
        return [debias(c) if c.strip() else template_caption(k) for c, k in zip(raw, keyword_lists)]
