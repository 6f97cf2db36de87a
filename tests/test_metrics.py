"""Retrieval, zero-shot and multi-label metrics against hand-ranked cases and a full-matrix argsort oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clapcli.eval import metrics
from clapcli.eval.metrics import (
    a2t_map10_laion_quirk,
    average_precision,
    multilabel_map,
    multilabel_mauc,
    retrieval_metrics,
    zeroshot_metrics,
)

KEYS = [f"{d}_{m}" for d in ("t2a", "a2t") for m in ("R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank")]


def test_perfect_ranking():
    audio = np.eye(6)
    out = retrieval_metrics(audio, audio.copy(), np.arange(6))
    assert sorted(out) == sorted(KEYS)
    for d in ("t2a", "a2t"):
        assert out[f"{d}_R@1"] == out[f"{d}_R@10"] == out[f"{d}_mAP@10"] == 1.0
        assert out[f"{d}_mean_rank"] == out[f"{d}_median_rank"] == 1.0
    # Embeddings straight from a model (tracking gradients, float16) are accepted as they are.
    live = torch.eye(6, dtype=torch.float16).requires_grad_()
    assert retrieval_metrics(live, live, np.arange(6)) == out


def test_reversed_ranking():
    """Caption i scores audio j with (j - i) mod 12: its own audio comes last of 12, both ways."""
    n = 12
    audio = np.eye(n)
    text = np.array([[(j - i) % n for j in range(n)] for i in range(n)], dtype=float)
    out = retrieval_metrics(audio, text, np.arange(n))
    for d in ("t2a", "a2t"):
        assert out[f"{d}_R@1"] == out[f"{d}_R@5"] == out[f"{d}_R@10"] == out[f"{d}_mAP@10"] == 0.0
        assert out[f"{d}_mean_rank"] == out[f"{d}_median_rank"] == 12.0


def test_ties_are_resolved_optimistically():
    audio = np.array([[0.5], [0.9], [0.5]])  # scores of a caption [1.0]: 0.5, 0.9, 0.5
    for owner in (0, 2):  # tied with the other 0.5, behind 0.9 only
        out = retrieval_metrics(audio, np.array([[1.0]]), np.array([owner]))
        assert out["t2a_mean_rank"] == 2.0 and out["t2a_R@1"] == 0.0 and out["t2a_mAP@10"] == 0.5
    # Every audio identical: a tie at the top counts as found.
    out = retrieval_metrics(np.ones((4, 2)), np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([3, 1]))
    assert out["t2a_R@1"] == 1.0 and out["a2t_R@1"] == 1.0


# Five captions per audio on three one-hot audios: caption m's text vector IS its row of scores, built from the
# position each caption should take in each audio's ranked caption list (score = 15 - position).
POSITIONS = np.array(
    [  # audio 0, audio 1, audio 2
        [3, 5, 0],  # captions 0-4 belong to audio 0
        [0, 6, 2],
        [11, 7, 3],
        [2, 8, 4],
        [12, 9, 5],
        [1, 4, 6],  # captions 5-9 belong to audio 1
        [4, 3, 7],
        [5, 2, 8],
        [6, 1, 11],
        [7, 0, 12],
        [8, 10, 1],  # captions 10-14 belong to audio 2
        [9, 11, 9],
        [10, 12, 10],
        [13, 13, 13],
        [14, 14, 14],
    ]
)
OWNERS = np.repeat(np.arange(3), 5)


def test_five_captions_per_audio_by_hand():
    text = 15.0 - POSITIONS
    out = retrieval_metrics(np.eye(3), text, OWNERS)
    # Text → audio, per caption (read across each row; equal scores tie in the caption's favour):
    # ranks 1,0,2,0,2 | 1,0,0,0,0 | 0,0,0,0,0 (captions 11-14 tie with other audios).
    assert out["t2a_R@1"] == pytest.approx(11 / 15)
    assert out["t2a_R@5"] == out["t2a_R@10"] == 1.0
    assert out["t2a_mAP@10"] == pytest.approx((11 + 2 / 2 + 2 / 3) / 15)
    assert out["t2a_mean_rank"] == pytest.approx(1 + 6 / 15)
    assert out["t2a_median_rank"] == 1.0
    # Audio → text: caption positions down each column. Audio 0's captions sit at 3, 0, 11, 2, 12 (sorted
    # 0, 2, 3, 11, 12): AP = (1/1 + 2/3 + 3/4) / 5. Audio 1's at 4, 3, 2, 1, 0: AP = 1. Audio 2's at
    # 1, 9, 10, 13, 14: AP = (1/2 + 2/10) / 5. Best positions 0, 0, 1.
    ap = [(1 + 2 / 3 + 3 / 4) / 5, 1.0, (1 / 2 + 2 / 10) / 5]
    assert out["a2t_mAP@10"] == pytest.approx(np.mean(ap))
    assert out["a2t_R@1"] == pytest.approx(2 / 3)
    assert out["a2t_R@5"] == out["a2t_R@10"] == 1.0
    assert out["a2t_mean_rank"] == pytest.approx(1 + 1 / 3)
    assert out["a2t_median_rank"] == 1.0
    # LAION's unsorted variant pairs caption-order positions with 1, 2, 3 …: audio 0 → (1/4 + 2/1 + 3/3) / 5,
    # audio 1 → (1/5 + 2/4 + 3/3 + 4/2 + 5/1) / 5 = 1.74 (above 1), audio 2 unchanged.
    quirk = [(1 / 4 + 2 + 1) / 5, 1.74, (1 / 2 + 2 / 10) / 5]
    assert a2t_map10_laion_quirk(np.eye(3), text, OWNERS) == pytest.approx(np.mean(quirk))


def test_tied_captions_of_one_audio_take_successive_positions():
    """Two captions of the audio tie at the top: positions 0 and 1, so AP is 1, never above it."""
    audio = np.eye(2)
    text = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = retrieval_metrics(audio, text, np.array([0, 0, 1]))
    assert out["a2t_mAP@10"] == 1.0 and out["a2t_R@1"] == 1.0


def _oracle(audio: np.ndarray, text: np.ndarray, owner: np.ndarray) -> tuple[dict, float]:
    """Every metric from full argsorts of the score matrix (Mei et al.'s recipe) and LAION's quirk."""
    scores = text @ audio.T  # (M, N)
    t2a = np.array([np.where(np.argsort(-scores[m], kind="stable") == owner[m])[0][0] for m in range(len(owner))])
    best, aps, quirks = [], [], []
    for a in range(audio.shape[0]):
        mine = np.where(owner == a)[0]
        if not mine.size:
            continue
        order = np.argsort(-scores[:, a], kind="stable")
        position = {c: int(np.where(order == c)[0][0]) for c in mine}
        ranked = np.sort(list(position.values()))
        best.append(ranked[0])
        aps.append(sum((i + 1) / (p + 1) for i, p in enumerate(ranked) if p < 10) / mine.size)
        caption_order = [position[c] for c in mine if position[c] < 10]
        quirks.append(sum((i + 1) / (p + 1) for i, p in enumerate(caption_order)) / mine.size)
    out = {}
    for d, ranks in (("t2a", t2a), ("a2t", np.array(best))):
        for k in (1, 5, 10):
            out[f"{d}_R@{k}"] = np.mean(ranks < k)
        out[f"{d}_mAP@10"] = np.mean([1 / (r + 1) if r < 10 else 0.0 for r in ranks])
        out[f"{d}_mean_rank"] = ranks.mean() + 1
        out[f"{d}_median_rank"] = np.floor(np.median(ranks)) + 1
    out["a2t_mAP@10"] = np.mean(aps)
    return out, float(np.mean(quirks))


@pytest.mark.parametrize("block_elements", [1 << 24, 4000, 37])
def test_full_matrix_oracle_on_random_embeddings(monkeypatch, block_elements):
    """Random embeddings, 1-7 captions per audio (one audio with none), also computed in tiny blocks."""
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(4)
    n_audio, dim = 40, 8
    counts = rng.integers(1, 8, size=n_audio)
    counts[7] = 0
    owner = rng.permutation(np.repeat(np.arange(n_audio), counts))
    audio = rng.normal(size=(n_audio, dim))
    text = audio[owner] + 1.2 * rng.normal(size=(owner.size, dim))  # related but imperfect
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    expected, expected_quirk = _oracle(audio, text, owner)
    got = retrieval_metrics(torch.from_numpy(audio), torch.from_numpy(text), owner)
    assert 0.05 < got["t2a_R@1"] < 0.95 and 0.05 < got["a2t_R@1"] < 0.95  # a case where ranks vary
    assert got == pytest.approx(expected, rel=1e-12)
    assert a2t_map10_laion_quirk(audio, text, owner) == pytest.approx(expected_quirk, rel=1e-12)


def test_retrieval_rejects_bad_caption_owners():
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3), np.eye(3), np.array([0, 1, 3]))
    with pytest.raises(ValueError):
        retrieval_metrics(np.eye(3), np.eye(3), np.array([0, 1]))


def test_zeroshot_metrics_by_hand():
    labels = np.eye(3)
    clips = np.array(
        [
            [0.9, 0.1, 0.0],  # target 0: right
            [0.2, 0.7, 0.1],  # target 1: right
            [0.6, 0.3, 0.1],  # target 1: predicted 0, target second
            [0.5, 0.1, 0.4],  # target 2: predicted 0, target second
            [0.7, 0.2, 0.1],  # target 2: predicted 0, target last
            [0.4, 0.4, 0.2],  # target 1: tied with label 0 at the top, counts as right
        ]
    )
    targets = np.array([0, 1, 1, 2, 2, 1])
    out = zeroshot_metrics(clips, labels, targets)
    assert out["top1"] == pytest.approx(3 / 6)
    assert out["top5"] == out["top10"] == 1.0
    assert out["mAP@10"] == pytest.approx((3 + 1 / 2 + 1 / 2 + 1 / 3) / 6)
    assert out["mean_rank"] == pytest.approx(1 + (0 + 0 + 1 + 1 + 2 + 0) / 6)
    assert out["per_class"] == [1.0, pytest.approx(2 / 3), 0.0]
    assert out["confusions"] == [
        {"target": 2, "predicted": 0, "count": 2},
        {"target": 1, "predicted": 0, "count": 1},
    ]
    assert zeroshot_metrics(clips, np.eye(4)[:, :3], targets)["per_class"][3] is None


def test_average_precision_and_multilabel_map():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision([0.9, 0.9, 0.1], [0, 1, 0]) == pytest.approx(0.5)  # one threshold holds the tie
    assert average_precision([0.1, 0.2, 0.3], [1, 1, 1]) == 1.0
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.9, 0.5], [0.7, 0.2, 0.5], [0.6, 0.3, 0.5]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])  # label 2 has no positive: left out
    assert multilabel_map(scores, targets) == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    with pytest.raises(ValueError):
        multilabel_map(scores, targets * 2)


def test_multilabel_mauc():
    scores = np.array([[0.9, 0.5], [0.8, 0.5], [0.7, 0.1], [0.6, 0.9]])
    targets = np.array([[1, 1], [0, 0], [1, 0], [0, 1]])
    # label 0: positives 0.9, 0.7 against negatives 0.8, 0.6 → 3 of 4 pairs; label 1: positives 0.5, 0.9
    # against 0.5, 0.1 → 0.5 (tie) + 1 + 1 + 1 of 4.
    assert multilabel_mauc(scores, targets) == pytest.approx((3 / 4 + 3.5 / 4) / 2)
