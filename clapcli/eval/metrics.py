"""Evaluation metrics on embeddings: retrieval both ways, zero-shot classification, multi-label mAP.

Pure functions of arrays (numpy or torch; nothing is loaded or logged here). Scores are dot products, so pass
L2-normalised embeddings to rank by cosine (a logit scale does not change any ranking).

Ranks are 0-based positions in a list sorted by descending score, with ties resolved OPTIMISTICALLY: an
item's rank is the number of items that score strictly higher, so a tie with the right answer counts in its
favour. (LAION's argsort breaks ties by index order instead; with continuous embeddings ties practically never
occur, so the two agree on real data.) A rank is found by counting, never by sorting a whole row, and the
score matrix is built in blocks, so 20k audios × 100k captions need neither a 2·10⁹-entry argsort nor the
whole matrix at once.
"""

from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MAP_CUTOFF = 10
_BLOCK_ELEMENTS = 1 << 24  # score-matrix entries built at once (64 MB of float32)


def _as_tensor(x) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t


def _rows_per_block(columns: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(columns, 1))


def _rank_summary(prefix: str, ranks: np.ndarray) -> dict[str, float]:
    """R@k, mAP@10 (one relevant item: 1/(rank+1) below the cutoff), mean and median rank (1-based)."""
    out = {f"{prefix}_R@{k}": float(np.mean(ranks < k)) for k in RECALL_KS}
    out[f"{prefix}_mAP@10"] = float(np.mean(np.where(ranks < MAP_CUTOFF, 1.0 / (ranks + 1), 0.0)))
    out[f"{prefix}_mean_rank"] = float(np.mean(ranks)) + 1
    out[f"{prefix}_median_rank"] = float(np.floor(np.median(ranks))) + 1  # LAION's floor(median) + 1
    return out


def _count_greater(scores: torch.Tensor, threshold: torch.Tensor) -> np.ndarray:
    """(R,) number of entries of each row of `scores` (R, C) strictly above that row's threshold (R,)."""
    if scores.device.type == "cpu":  # numpy counts a boolean mask several times faster than torch's sum
        return np.count_nonzero(scores.numpy() > threshold.numpy()[:, None], axis=1).astype(np.int64)
    return (scores > threshold[:, None]).sum(dim=1).cpu().numpy()


def _check_retrieval_inputs(audio: torch.Tensor, text: torch.Tensor, owner: np.ndarray) -> None:
    if audio.ndim != 2 or text.ndim != 2 or audio.shape[1] != text.shape[1]:
        raise ValueError(f"audio (N, D) and text (M, D) must share D; got {tuple(audio.shape)}, {tuple(text.shape)}")
    if owner.shape != (text.shape[0],):
        raise ValueError(f"text_to_audio must hold one audio index per caption: {owner.shape} vs {text.shape[0]}")
    if owner.size and (owner.min() < 0 or owner.max() >= audio.shape[0]):
        raise ValueError(f"text_to_audio holds an index outside 0 … {audio.shape[0] - 1}")


def text_to_audio_ranks(audio, text, text_to_audio) -> np.ndarray:
    """(M,) 0-based rank of each caption's own audio among all N audios."""
    audio, text = _as_tensor(audio), _as_tensor(text)
    owner = np.asarray(text_to_audio, dtype=np.int64)
    _check_retrieval_inputs(audio, text, owner)
    owner_t = torch.as_tensor(owner, device=text.device)
    ranks = []
    step = _rows_per_block(audio.shape[0])
    for start in range(0, text.shape[0], step):
        scores = text[start : start + step] @ audio.T  # (m, N)
        rows = torch.arange(scores.shape[0], device=scores.device)
        gt = scores[rows, owner_t[start : start + step]]  # (m,)
        ranks.append(_count_greater(scores, gt))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def audio_to_text_positions(audio, text, text_to_audio) -> list[np.ndarray]:
    """For each audio: the 0-based positions of its captions in its ranked caption list, in CAPTION-INDEX order.

    Positions are distinct: captions of the same audio that tie are placed one after another, in caption-index
    order, ahead of tied captions of other audios (the optimistic rule). An audio without captions gets an
    empty array.
    """
    audio, text = _as_tensor(audio), _as_tensor(text)
    owner = np.asarray(text_to_audio, dtype=np.int64)
    _check_retrieval_inputs(audio, text, owner)
    n_audio = audio.shape[0]
    order = np.argsort(owner, kind="stable")  # captions grouped by audio, caption order kept in a group
    counts = np.bincount(owner, minlength=n_audio)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    positions: list[np.ndarray] = []
    step = _rows_per_block(text.shape[0])
    for start in range(0, n_audio, step):
        stop = min(start + step, n_audio)
        scores = audio[start:stop] @ text.T  # (n, M): row j scores every caption against audio start+j
        caps = order[bounds[start] : bounds[stop]]  # every caption of these audios, grouped by audio
        rows = owner[caps] - start  # (P,) row of each caption's audio
        slot = np.arange(caps.size) - (bounds[owner[caps]] - bounds[start])  # k-th caption of its audio
        gt = scores[torch.as_tensor(rows, device=scores.device), torch.as_tensor(caps, device=scores.device)]
        strictly_higher = np.empty(caps.size, dtype=np.int64)
        for k in range(int(slot.max(initial=-1)) + 1):  # one pass per caption slot: no (P, M) copy
            sel = np.nonzero(slot == k)[0]
            if sel.size == stop - start:  # every audio has a k-th caption: compare the rows as they are
                block = scores
            else:
                block = scores[torch.as_tensor(rows[sel], device=scores.device)]
            strictly_higher[sel] = _count_greater(block, gt[torch.as_tensor(sel, device=gt.device)])
        gt = gt.cpu().numpy()
        for a in range(start, stop):
            lo, hi = bounds[a] - bounds[start], bounds[a + 1] - bounds[start]
            positions.append(_distinct_positions(strictly_higher[lo:hi], gt[lo:hi]))
    return positions


def _distinct_positions(strictly_higher: np.ndarray, own_scores: np.ndarray) -> np.ndarray:
    """Place one audio's tied relevant captions in successive slots (caption-index order within a tie)."""
    if strictly_higher.size <= 1:
        return strictly_higher.astype(np.int64)
    # Sort by descending score, caption order among equal scores; walk down assigning max(rank, previous + 1).
    by_rank = np.lexsort((np.arange(own_scores.size), -own_scores))
    placed = np.empty_like(strictly_higher, dtype=np.int64)
    previous = -1
    for i in by_rank:
        previous = max(int(strictly_higher[i]), previous + 1)
        placed[i] = previous
    return placed


def _a2t_average_precision(positions: np.ndarray) -> float:
    """Precision at each relevant caption's sorted position below 10, summed, over the number of relevant."""
    ranked = np.sort(positions)
    hits = np.arange(1, ranked.size + 1)
    keep = ranked < MAP_CUTOFF
    return float(np.sum(hits[keep] / (ranked[keep] + 1)) / ranked.size)


def retrieval_metrics(audio, text, text_to_audio) -> dict[str, float]:
    """Text→audio and audio→text retrieval, several captions per audio allowed (LAION's 5-caption protocol).

    audio: (N, D); text: (M, D); text_to_audio: (M,) index of each caption's audio.

    - t2a_* over every caption: rank r of its audio; R@k = mean(r < k); mAP@10 = mean(1/(r+1) if r < 10 else 0);
      mean rank = mean(r) + 1; median rank = floor(median(r)) + 1.
    - a2t_* over every audio that has a caption: R@k and mean/median rank use the BEST-placed of its captions;
      mAP@10 is the average precision at cutoff 10: with the audio's K captions at sorted positions
      p₁ < p₂ < … (0-based), AP = Σ_{i: pᵢ < 10} i / (pᵢ + 1) / K, so all captions on top gives 1.
      This is the metric of Mei et al.'s retrieval code. LAION's `evaluate_clotho_audiocaps` forgets to sort
      the positions and pairs the i-th caption in caption-index order with i, so its value depends on the order
      of the captions and can exceed 1; `a2t_map10_laion_quirk` reproduces that number for comparison.
    """
    t2a = text_to_audio_ranks(audio, text, text_to_audio)
    out = _rank_summary("t2a", t2a)
    positions = [p for p in audio_to_text_positions(audio, text, text_to_audio) if p.size]
    best = np.array([p.min() for p in positions], dtype=np.int64)
    a2t = _rank_summary("a2t", best)
    a2t["a2t_mAP@10"] = float(np.mean([_a2t_average_precision(p) for p in positions]))
    out.update(a2t)
    return out


def a2t_map10_laion_quirk(audio, text, text_to_audio) -> float:
    """Audio→text mAP@10 exactly as LAION-CLAP computes it (unsorted positions), for comparison only."""
    scores = []
    for p in audio_to_text_positions(audio, text, text_to_audio):
        if not p.size:
            continue
        keep = p < MAP_CUTOFF
        filtered = p[keep]  # caption-index order, not sorted
        scores.append(float(np.sum(np.arange(1, filtered.size + 1) / (filtered + 1)) / p.size))
    return float(np.mean(scores))


def zeroshot_metrics(audio, label_text, targets, max_confusions: int = 10) -> dict:
    """Zero-shot classification: each clip (N, D) against every label's text embedding (L, D); targets (N,).

    Returns {"top1", "top5", "top10", "mAP@10", "mean_rank"} as floats over clips (the target label's rank,
    optimistic on ties, as in `retrieval_metrics`), "per_class": a list of L top-1 accuracies (None for
    labels no clip has), and "confusions": up to `max_confusions` {"target", "predicted", "count"} records, most
    frequent first, of clips whose best label (first by index among the top scores) is not their target.
    """
    audio, label_text = _as_tensor(audio), _as_tensor(label_text)
    targets = np.asarray(targets, dtype=np.int64)
    n_labels = label_text.shape[0]
    if targets.shape != (audio.shape[0],) or (targets.size and (targets.min() < 0 or targets.max() >= n_labels)):
        raise ValueError(f"targets must be (N,) label indices in 0 … {n_labels - 1}")
    ranks = text_to_audio_ranks(label_text, audio, targets)  # clips query labels: the same counting
    predicted = np.empty_like(targets)
    step = _rows_per_block(n_labels)
    for start in range(0, audio.shape[0], step):
        predicted[start : start + step] = (audio[start : start + step] @ label_text.T).argmax(dim=1).cpu().numpy()
    predicted = np.where(ranks == 0, targets, predicted)  # a tie at the top counts as correct, as top1 does
    out: dict = {f"top{k}": float(np.mean(ranks < k)) for k in RECALL_KS}
    out["mAP@10"] = float(np.mean(np.where(ranks < MAP_CUTOFF, 1.0 / (ranks + 1), 0.0)))
    out["mean_rank"] = float(np.mean(ranks)) + 1
    correct = ranks == 0
    out["per_class"] = [float(np.mean(correct[targets == c])) if np.any(targets == c) else None for c in range(n_labels)]
    wrong = ~correct
    pairs, counts = np.unique(np.stack([targets[wrong], predicted[wrong]], axis=1), axis=0, return_counts=True)
    top = np.lexsort((pairs[:, 1], pairs[:, 0], -counts))[:max_confusions] if counts.size else []
    out["confusions"] = [{"target": int(pairs[i, 0]), "predicted": int(pairs[i, 1]), "count": int(counts[i])} for i in top]
    return out


def _check_multilabel(scores, targets) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be (N, L); got {scores.shape} and {targets.shape}")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError("targets must be 0/1")
    return scores, targets.astype(bool)


def average_precision(scores, relevant) -> float:
    """Non-interpolated average precision of one class: Σ over distinct score thresholds of (ΔR)·P.

    Tied scores form one threshold (the definition scikit-learn's `average_precision_score` uses).
    """
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    positives = int(relevant.sum())
    if positives == 0:
        raise ValueError("average precision needs at least one relevant item")
    order = np.argsort(-scores, kind="stable")
    s, r = scores[order], relevant[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # index of the last item at each threshold
    tp = np.cumsum(r)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_gain = np.diff(np.r_[0, tp]) / positives
    return float(np.sum(recall_gain * precision))


def multilabel_map(scores, targets) -> float:
    """Mean over labels of `average_precision`; labels with no positive clip are left out of the mean."""
    scores, targets = _check_multilabel(scores, targets)
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1]) if targets[:, c].any()]
    if not aps:
        raise ValueError("no label has a positive clip")
    return float(np.mean(aps))


def multilabel_mauc(scores, targets) -> float:
    """Mean over labels of the ROC AUC (the probability a positive outscores a negative, ties counting ½);
    labels that have no positive or no negative clip are left out of the mean."""
    scores, targets = _check_multilabel(scores, targets)
    aucs = []
    for c in range(scores.shape[1]):
        pos, neg = scores[targets[:, c], c], scores[~targets[:, c], c]
        if pos.size == 0 or neg.size == 0:
            continue
        neg_sorted = np.sort(neg)
        below = np.searchsorted(neg_sorted, pos, side="left")
        ties = np.searchsorted(neg_sorted, pos, side="right") - below
        aucs.append(float(np.sum(below + 0.5 * ties) / (pos.size * neg.size)))
    if not aucs:
        raise ValueError("no label has both positive and negative clips")
    return float(np.mean(aucs))
