"""Zero-shot tagging: label sets, prompt templates, scoring, the label-embedding cache and `tag_files`.

Everything here is numpy-only; the model is passed in (see `clapcli.api`), so importing this package
never imports torch.
"""

from .cache import cached_label_embeddings, label_cache_dir
from .labels import LabelSet, LabelSetError, builtin_labelsets, resolve_labels
from .prompts import DEFAULT_TEMPLATE, TemplateError, render
from .scoring import RankedLabel, Scorer, Scores, ZeroShotScorer, label_embeddings, score, select, top_k
from .tag import CSV_HEADER, FileTags, LabelScore, WindowTags, tag_files, zero_shot_scorer

__all__ = [
    "CSV_HEADER",
    "DEFAULT_TEMPLATE",
    "FileTags",
    "LabelScore",
    "LabelSet",
    "LabelSetError",
    "RankedLabel",
    "Scorer",
    "Scores",
    "TemplateError",
    "WindowTags",
    "ZeroShotScorer",
    "builtin_labelsets",
    "cached_label_embeddings",
    "label_cache_dir",
    "label_embeddings",
    "render",
    "resolve_labels",
    "score",
    "select",
    "tag_files",
    "top_k",
    "zero_shot_scorer",
]
