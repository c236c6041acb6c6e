"""Near-duplicate groups of an index: images whose global (CLS) vectors have cosine >= a threshold.

Exact copies (the same JPEG data, or the same pixels) never reach an index (a content hash refuses them); this finds
modified copies: crops, rescales, JPEG re-encodes, colour changes. Each image's vector searches
the index for its nearest neighbours; pairs at or above the threshold are joined into groups
(connected components), so a group can hold a chain whose two ends are less alike than the threshold.

The threshold is calibrated on the index itself (`calibrate_threshold`): edited copies of a sample of
its images are embedded with its own model, and the threshold is set just above the closest any copy
comes to an image other than its original. So it fits whatever model built the index.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from .errors import UserError
from .index import Index

BATCH = 1024  # queries per search call: large enough for FAISS's batching, small in memory
DISTRACTOR_DEPTH = 10  # neighbours of a copy looked through for the nearest other picture
# A calibrated threshold is never below this: at cosine 0.5 two vectors are 60 degrees apart, no closer to
# each other than to orthogonal, which cannot mean "the same picture" whatever a sample of copies shows.
THRESHOLD_FLOOR = 0.5
THRESHOLD_STEP = 0.001  # a calibrated threshold is rounded up to this: readable, and still above every copy
CALIBRATION_BATCH = 8  # sampled images whose copies are embedded together: bounds the memory features take

Embed = Callable[[list[Image.Image]], np.ndarray]  # RGB images -> (n, d) float32 CLS vectors, L2-normalised
MakeCopies = Callable[[Image.Image, int], list[tuple[str, Image.Image]]]  # (picture, seed) -> (edit, copy)s


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


def check_settings(threshold: float | None, neighbours: int) -> None:
    """Refuse settings that cannot find anything meaningful, saying what would (None: to be calibrated)."""
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold} is not a cosine similarity: give one between -1 and 1, or auto.")
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


# --- calibrating the threshold on the index's own images ----------------------------------------

@dataclass
class CopyScores:
    """Every calibration copy: the image it was made from, by which edit, and how close it comes."""

    originals: np.ndarray  # (c,) int64 id of the image each copy was made from
    transforms: list[str]  # (c,) the edit that made it
    to_original: np.ndarray  # (c,) float32 cosine to its original's stored vector
    to_other: np.ndarray  # (c,) float32 highest cosine to any other image that can be found
    nearest_other: np.ndarray  # (c,) int64 id of that other image

    @classmethod
    def join(cls, parts: list["CopyScores"]) -> "CopyScores":
        """The copies of several parts, in order, as one."""
        arrays = {f: np.concatenate([getattr(p, f) for p in parts])
                  for f in ("originals", "to_original", "to_other", "nearest_other")}
        return cls(transforms=[name for p in parts for name in p.transforms], **arrays)


@dataclass
class Calibration:
    """A threshold measured on an index: just above the closest any copy came to another image (so no
    copy of the sample would be grouped with the wrong picture), and the share of copies it still catches."""

    threshold: float
    recall: float  # share of the copies at or above the threshold with their own original
    images: int  # images sampled
    seed: int
    scores: CopyScores

    @property
    def closest_other(self) -> float:
        """The highest cosine of any copy to an image other than its original."""
        return float(self.scores.to_other.max())

    @property
    def floored(self) -> bool:
        """True when every copy was so far from other images that THRESHOLD_FLOOR set the threshold."""
        return self.threshold == THRESHOLD_FLOOR and self.closest_other < THRESHOLD_FLOOR

    def by_transform(self) -> dict[str, dict]:
        """Per edit, in the order made: copies, their lowest and median cosine to the original, and recall."""
        names = np.array(self.scores.transforms)
        figures = {}
        for name in dict.fromkeys(self.scores.transforms):
            cos = self.scores.to_original[names == name]
            figures[name] = {"copies": len(cos), "min": float(cos.min()), "median": float(np.median(cos)),
                             "recall": float((cos >= self.threshold).mean())}
        return figures

    def to_dict(self) -> dict:
        """The figures as plain data, for --json."""
        at = int(np.argmax(self.scores.to_other))
        closest = {"cosine": self.closest_other, "original": int(self.scores.originals[at]),
                   "transform": self.scores.transforms[at], "other": int(self.scores.nearest_other[at])}
        return {"threshold": self.threshold, "recall": self.recall, "images": self.images, "seed": self.seed,
                "copies": len(self.scores.transforms), "floor": THRESHOLD_FLOOR, "closest_copy_to_other": closest,
                "transforms": self.by_transform()}


def calibrate_threshold(index: Index, embed: Embed, make_copies: MakeCopies, sample: int = 50, seed: int = 0,
                        progress: Callable[[int, int], None] | None = None) -> Calibration:
    """The threshold for this index and its model: `sample` of its images (seeded) are copied by each
    edit of `make_copies` from their stored thumbnails, embedded with `embed`, and compared with the index.
    `progress(done, total)` is called after each batch of sampled images."""
    rng = np.random.default_rng(seed)
    ids = pick_sample(index, sample, rng)
    copy_seeds = rng.integers(0, 2**31, len(ids))  # one per image: its copies' edits are drawn from it
    parts = []
    for at in range(0, len(ids), CALIBRATION_BATCH):
        end = at + CALIBRATION_BATCH
        parts.append(score_sample(index, ids[at:end], copy_seeds[at:end], embed, make_copies))
        if progress is not None:
            progress(min(end, len(ids)), len(ids))
    scores = CopyScores.join(parts)
    threshold = threshold_above(float(scores.to_other.max()))
    return Calibration(threshold, float((scores.to_original >= threshold).mean()), len(ids), seed, scores)


def score_sample(index: Index, ids: np.ndarray, seeds: np.ndarray, embed: Embed,
                 make_copies: MakeCopies) -> CopyScores:
    """Copies of a few sampled images, made from their thumbnails, embedded together and scored."""
    made = [(int(i), name, copy) for i, seed in zip(ids, seeds)
            for name, copy in make_copies(load_thumbnail(index, int(i)), int(seed))]
    cls = embed([copy for _, _, copy in made])  # (copies, d) float32, L2-normalised
    return score_copies(index, np.array([i for i, _, _ in made], np.int64), [name for _, name, _ in made], cls)


def check_calibration(index: Index, sample: int) -> None:
    """Refuse, before any model is loaded, an index or a sample that cannot be calibrated on."""
    if sample < 1:
        raise UserError(f"--sample {sample} must be at least 1: how many of the index's images to make copies of.")
    live = index.live_ids()
    if len(live) < 2:
        raise UserError(f"The index holds {len(live)} image{'s' if len(live) != 1 else ''}: calibrating a threshold "
                        "needs at least 2 (a copy must be told from another image). Give --threshold a cosine.")
    load_thumbnail(index, int(live[0]))


def pick_sample(index: Index, sample: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) ascending ids of `sample` images drawn at random (all of them in a smaller index)."""
    check_calibration(index, sample)
    live = index.live_ids()
    return np.sort(rng.choice(live, min(sample, len(live)), replace=False))


def load_thumbnail(index: Index, image_id: int) -> Image.Image:
    """The stored thumbnail of an image, as RGB: the picture the calibration copies are made from."""
    data = index.row(image_id)["thumbnail"]
    if not data:
        raise UserError(f"The index at {index.path} stores no thumbnails (built with --thumb-size 0), and calibrating "
                        "the threshold makes copies of them: give --threshold a cosine between -1 and 1 instead.")
    return Image.open(io.BytesIO(data)).convert("RGB")


def score_copies(index: Index, originals: np.ndarray, transforms: list[str], cls: np.ndarray) -> CopyScores:
    """Each copy's cosine to its original's stored vector, and its highest to another picture.

    An image of the index that is at least as like the original as the original's typical copy (the
    median of its copies' cosines) is taken for a copy already in the index, not another picture: a
    collection with near duplicates (what this command is run to find) must not push the threshold
    up to them."""
    to_original = np.einsum("cd,cd->c", cls, index.vectors(originals)).astype(np.float32)
    typical = {o: float(np.median(to_original[originals == o])) for o in np.unique(originals)}
    to_other, nearest = np.full(len(cls), -1.0, np.float32), np.full(len(cls), -1, np.int64)
    for c, o in enumerate(originals):
        to_other[c], nearest[c] = _nearest_other_picture(index, cls[c], int(o), typical[int(o)])
    return CopyScores(originals.astype(np.int64), list(transforms), to_original, to_other, nearest)


def _nearest_other_picture(index: Index, copy: np.ndarray, original: int, typical: float) -> tuple[float, int]:
    """(cosine, id) of the image nearest to `copy` that is neither its original nor at least `typical`-like
    to it; looks deeper until one is found or the index is exhausted ((-1, -1) then)."""
    depth, target = DISTRACTOR_DEPTH, index.vector(original)
    while True:
        scores, found = index.global_index.search(copy[None].astype(np.float32), min(depth, index.count))
        for score, j in zip(scores[0], found[0]):
            if j >= 0 and j != original and float(index.vector(int(j)) @ target) < typical:
                return float(score), int(j)
        if depth >= index.count:
            return -1.0, -1
        depth *= 4


def threshold_above(closest: float) -> float:
    """The lowest multiple of THRESHOLD_STEP strictly above `closest`, kept within [THRESHOLD_FLOOR, 1]."""
    threshold = round((math.floor(closest / THRESHOLD_STEP) + 1) * THRESHOLD_STEP, 3)
    if threshold <= closest:  # float rounding put it on or under `closest`
        threshold = round(threshold + THRESHOLD_STEP, 3)
    return min(1.0, max(THRESHOLD_FLOOR, threshold))
