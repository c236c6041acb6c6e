"""Retrieval metrics: average precision, the revisited Oxford/Paris protocol, precision@k.

Pure numpy on rankings (lists of item ids, best first), so the same code scores exact and
compressed indexes, image and region search. A ranking may be cut short (search returns at
most so many results): a positive it does not hold adds nothing, so the figure is then a lower
bound of the full-ranking one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from dino_demo.geometry import Box

Ranking = Sequence[int]  # item ids, most similar first


@dataclass
class RevisitedTruth:
    """Ground truth of one revisited Oxford/Paris query (gnd_roxford5k.pkl's `gnd` entries)."""

    easy: list[int]
    hard: list[int]
    junk: list[int]
    box: Box | None = None  # in the query's pixels


@dataclass
class Summary:
    """Mean figures over the queries that have at least one positive; fractions in [0, 1]."""

    map: float
    queries: int  # queries counted in the means
    precision: dict[int, float] = field(default_factory=dict)  # k -> mean precision@k
    aps: list[float] = field(default_factory=list)  # per query, NaN where it had no positive

    def to_json(self) -> dict:
        return {"map": self.map, "queries": self.queries,
                "precision": {str(k): v for k, v in self.precision.items()},
                "aps": [None if np.isnan(a) else a for a in self.aps]}  # per query, in query order


def positive_ranks(ranking: Ranking, positives: Iterable[int], junk: Iterable[int] = ()) -> np.ndarray:
    """0-based ranks of the positives in `ranking` once the junk items are taken out of it."""
    positives, junk = set(positives), set(junk)
    ranks, rank = [], 0
    for item in ranking:
        if item in junk:  # ignored: neither a hit nor a miss, and it does not push others down
            continue
        if item in positives:
            ranks.append(rank)
        rank += 1
    return np.asarray(ranks, dtype=np.float64)


def revisited_ap(ranks: np.ndarray, n_positives: int) -> float:
    """AP by the trapezoid rule over the precision-recall curve, as revisitop's `compute_ap`."""
    ranks = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(ranks), dtype=np.float64)
    # precision just before (j positives in `rank` items) and at (j + 1 in rank + 1) each positive
    before = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1.0))
    at = (j + 1) / (ranks + 1)
    return float(((before + at) / 2).sum() / n_positives)


def average_precision(ranking: Ranking, positives: Iterable[int]) -> float:
    """Plain AP: mean over all positives of the precision at its rank; one not ranked counts 0."""
    positives = set(positives)
    ranks = positive_ranks(ranking, positives)
    return float(((np.arange(len(ranks)) + 1) / (ranks + 1)).sum() / len(positives))


def precision_at(ranking: Ranking, positives: Iterable[int], k: int) -> float:
    """Fraction of the first k results that are positives."""
    positives = set(positives)
    return sum(1 for item in list(ranking)[:k] if item in positives) / k


def summarise(rankings: Sequence[Ranking], positives: Sequence[Iterable[int]], ks: Sequence[int] = ()) -> Summary:
    """Plain mAP and mean precision@k; queries without positives are left out of the means."""
    aps, precisions = [], {k: [] for k in ks}
    for ranking, pos in zip(rankings, positives, strict=True):
        pos = set(pos)
        if not pos:
            aps.append(float("nan"))
            continue
        aps.append(average_precision(ranking, pos))
        for k in ks:
            precisions[k].append(precision_at(ranking, pos, k))
    return _summary(aps, {k: _mean(v) for k, v in precisions.items()})


def revisited_map(rankings: Sequence[Ranking], truths: Sequence[RevisitedTruth]) -> dict[str, Summary]:
    """mAP for the Medium and Hard settings of the revisited Oxford/Paris protocol.

    Medium: easy and hard images are positives, junk is ignored. Hard: only hard images are
    positives, easy and junk are ignored.
    """
    settings = {
        "medium": lambda t: (t.easy + t.hard, t.junk),
        "hard": lambda t: (t.hard, t.junk + t.easy),
    }
    out = {}
    for name, split in settings.items():
        aps = []
        for ranking, truth in zip(rankings, truths, strict=True):
            pos, junk = split(truth)
            pos_set = set(pos)
            aps.append(revisited_ap(positive_ranks(ranking, pos_set, junk), len(pos_set)) if pos_set else float("nan"))
        out[name] = _summary(aps, {})
    return out


def _summary(aps: list[float], precision: dict[int, float]) -> Summary:
    counted = [a for a in aps if not np.isnan(a)]
    return Summary(_mean(counted), len(counted), precision, aps)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")
