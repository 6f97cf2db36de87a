"""Small numpy helpers shared by the API, the index and tagging."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unit-length float32 vectors along `axis`; an all-zero vector stays zero instead of dividing by 0."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)
