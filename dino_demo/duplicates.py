"""Near-duplicate groups of an index: images whose global (CLS) vectors have cosine >= a threshold.

Exact copies (the same pixels) never reach an index (a content hash refuses them); this finds
modified copies: crops, rescales, JPEG re-encodes, colour changes. Each image's vector searches
the index for its nearest neighbours; pairs at or above the threshold are joined into groups
(connected components), so a group can hold a chain whose two ends are less alike than the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UserError
from .index import Index

BATCH = 1024  # queries per search call: large enough for FAISS's batching, small in memory


@dataclass
class DuplicateGroup:
    """Images found alike: their ids (ascending) and every pair found at or above the threshold."""

    ids: list[int]
    pairs: list[tuple[int, int, float]]  # (id a, id b, cosine) with a < b, most alike first

    @property
    def best(self) -> float:
        """The similarity of the most alike pair."""
        return self.pairs[0][2]

    @property
    def weakest(self) -> float:
        """The similarity of the least alike pair that joined the group (not of every two members)."""
        return self.pairs[-1][2]


def find_duplicate_groups(index: Index, threshold: float, neighbours: int = 20,
                          progress: Callable[[int, int], None] | None = None) -> list[DuplicateGroup]:
    """Groups of images whose CLS cosine is >= `threshold`, largest first, then most alike first.

    Each image looks at its `neighbours` nearest images only. A group bigger than that is still
    found whole when its members link up through chains of pairs; what is missed is a member all of
    whose links lie beyond its neighbours. On a compressed (HNSW) index the search is approximate.
    `progress(done, total)` is called after each batch of images searched."""
    check_settings(threshold, neighbours)
    pairs = find_pairs(index, threshold, neighbours, progress)
    return group_pairs(pairs)


def check_settings(threshold: float, neighbours: int) -> None:
    """Refuse settings that cannot find anything meaningful, saying what would."""
    if not -1.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold} is not a cosine similarity: give one between -1 and 1 (e.g. 0.9).")
    if neighbours < 1:
        raise UserError(f"--neighbours {neighbours} must be at least 1: how many nearest images each image looks at.")


def find_pairs(index: Index, threshold: float, neighbours: int,
               progress: Callable[[int, int], None] | None = None) -> dict[tuple[int, int], float]:
    """(id a, id b) with a < b -> cosine, for every pair found at or above `threshold`."""
    ids = index.live_ids()
    k = min(neighbours + 1, len(ids))  # + 1: an image finds itself first
    pairs: dict[tuple[int, int], float] = {}
    for start in range(0, len(ids), BATCH):
        batch = ids[start:start + BATCH]
        vectors = index.vectors(batch)  # (b, d) float32, L2-normalised
        scores, found = index.global_index.search(vectors, k)  # (b, k); -1 / -inf where none
        for query, row_scores, row_ids in zip(batch.tolist(), scores, found):
            for score, other in zip(row_scores.tolist(), row_ids.tolist()):
                if other < 0 or other == query or score < threshold:
                    continue
                key = (min(query, other), max(query, other))
                pairs[key] = max(score, pairs.get(key, score))  # each side's search scores it (close, not equal)
        if progress is not None:
            progress(min(start + BATCH, len(ids)), len(ids))
    return pairs


def group_pairs(pairs: dict[tuple[int, int], float]) -> list[DuplicateGroup]:
    """Connected components of the pairs (union-find), largest first, then most alike first."""
    parent: dict[int, int] = {}

    def root(i: int) -> int:
        parent.setdefault(i, i)
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps chains short
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in parent:
        members.setdefault(root(i), []).append(i)
    edges: dict[int, list[tuple[int, int, float]]] = {r: [] for r in members}
    for (a, b), score in pairs.items():
        edges[root(a)].append((a, b, score))
    groups = [DuplicateGroup(sorted(members[r]), sorted(edges[r], key=lambda e: (-e[2], e[0], e[1]))) for r in members]
    return sorted(groups, key=lambda g: (-len(g.ids), -g.best, g.ids[0]))
