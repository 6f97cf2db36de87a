"""Zero-shot tagging: label sets, prompt templates, scoring, the label-embedding cache and `tag_files`.

Everything here is numpy-only; the model is passed in (see `clapcli.engine`), so importing this package
never imports torch. Names are resolved lazily, so importing `clapcli.tagging.prompts` (the CLI's help
does, for the default template) imports neither numpy nor the rest of the package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "cached_label_embeddings": "cache",
    "label_cache_dir": "cache",
    "LabelSet": "labels",
    "LabelSetError": "labels",
    "builtin_labelsets": "labels",
    "resolve_labels": "labels",
    "DEFAULT_TEMPLATE": "prompts",
    "TemplateError": "prompts",
    "render": "prompts",
    "RankedLabel": "scoring",
    "Scorer": "scoring",
    "Scores": "scoring",
    "ZeroShotScorer": "scoring",
    "label_embeddings": "scoring",
    "score": "scoring",
    "select": "scoring",
    "top_k": "scoring",
    "CSV_HEADER": "tag",
    "FileTags": "tag",
    "LabelScore": "tag",
    "WindowTags": "tag",
    "tag_files": "tag",
    "zero_shot_scorer": "tag",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .cache import cached_label_embeddings, label_cache_dir
    from .labels import LabelSet, LabelSetError, builtin_labelsets, resolve_labels
    from .prompts import DEFAULT_TEMPLATE, TemplateError, render
    from .scoring import RankedLabel, Scorer, Scores, ZeroShotScorer, label_embeddings, score, select, top_k
    from .tag import CSV_HEADER, FileTags, LabelScore, WindowTags, tag_files, zero_shot_scorer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
