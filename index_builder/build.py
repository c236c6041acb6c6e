"""Source rows -> decoded, face-checked, resized images -> embeddings -> index_writer.Writer.

Decoding runs in worker processes (`Decoder`) a few batches ahead of the model, so the GPU does
not wait on JPEG decoding. Rows are taken in order and written in chunks, which is what lets a
killed build resume where it stopped with every image exactly once.
"""
from __future__ import annotations

import multiprocessing
import os
from functools import partial
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
from PIL import Image

from dino_demo.config import setting
from dino_demo.errors import UserError
from dino_demo.face_torch import BACKENDS as FACE_GATE_BACKENDS, TorchFaceGate, gate_factory, gate_needs_spawn
from dino_demo.faces import UPRIGHT, FaceGate
from dino_demo.images import (DEFAULT_MAX_PIXELS, THUMB_QUALITY, THUMB_SIDE, ImageError, Nvjpeg, content_hash,
                               jpeg_data_hash, load_image, load_image_tensors, make_thumbnail, nvjpeg, picture_size,
                               plain_jpeg, resize_picture, thumbnail_size)
from dino_demo.index import MANIFEST, IndexFolderError, load_index, read_manifest
from dino_demo.index_types import INDEX_TYPES, choose_layout
from dino_demo.index_writer import Chunk, Writer, chunk_hashes, hold_lock, now, unfinished_run, write_tombstones
from dino_demo.model import Embedder, Features, prepare_image, prepare_pictures

from .source import Row, Source

DECODERS = ("auto", "cpu", "gpu")
GateFactory = Callable[[], FaceGate]  # makes a face gate in each decoding process; must pickle (a class does)
CodecFactory = Callable[[], "Nvjpeg | None"]  # makes the JPEG codec of a decoding process (GPU decoding)
JPEG_DATA = "jpeg-data"  # an index's "content_hash": plain JPEGs hashed by their image data, the rest by pixels


def default_workers() -> int:
    """Decoding and the face gate are the CPU's share of a build and, on a GPU box, its limit: every
    core but the one feeding the model."""
    return max(1, (os.cpu_count() or 2) - 1)


@dataclass
class BuildOptions:
    """How a build runs; `python -m index_builder` makes one command-line option per field."""

    batch_size: int = setting(64, "images per model batch", shown="256 on a GPU, 64 elsewhere")
    workers: int = setting(help="image-decoding processes (0: decode in the main process)", minimum=0,
                           factory=default_workers, shown="one per core but one")
    chunk_size: int = setting(1024, "images per resumable chunk: a kill loses at most this much work")
    thumb_size: int = setting(THUMB_SIDE, "longer side of stored thumbnails in pixels (0: none)", minimum=0)
    skip_faces: bool = setting(True, "leave out photos of people, and count them")
    turned_faces: bool = setting(True, "also look for faces in photos turned on their side or upside down "
                                 "(about 4x the face gate's time on a photo without a face; README, Speed)")
    face_gate_backend: str = setting("auto", "what runs the face gate: mediapipe, or torch (MediaPipe's models, "
                                     "batched; the same decision); auto: torch on a GPU, else mediapipe",
                                     choices=FACE_GATE_BACKENDS)
    limit: int | None = setting(None, "index at most the first N rows", shown="every row")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "skip images larger than this many pixels", shown="52 million")
    patches: str = setting("auto", "patch vectors kept per image for region search: all, pooled (2x2), salient[:N] "
                           "(the N most CLS-like, 16 by default), or auto: all up to 20,000 images, else pooled")
    index_type: str = setting("auto", "auto: exact search for small collections, HNSW (images) and IVF-PQ "
                              "(patches) beyond (README, Scale); or force one", choices=INDEX_TYPES)
    decode: str = setting("auto", "where JPEGs are decoded: gpu (nvJPEG; needs torchvision built for the GPU's "
                          "torch) or cpu (Pillow); auto: the model's GPU when it can, else cpu", choices=DECODERS)


def jpeg_codec(decode: str, device: str, hashes: str | None) -> CodecFactory | None:
    """What a build's decoding processes decode plain JPEGs with: nvJPEG on the model's GPU (`decode` gpu, or
    auto where it can), else None (Pillow). A wrong `decode` gpu is refused in one line."""
    if decode == "cpu" or (decode == "auto" and not device.startswith("cuda")):
        return None
    if hashes != JPEG_DATA:
        if decode == "gpu":
            raise UserError("This index hashes its images by Pillow's pixels (it was built before JPEGs were hashed "
                            "by their data), which a GPU decoder does not reproduce: add to it with --decode cpu, "
                            "or build it anew into another folder.")
        return None
    if nvjpeg(device) is None:
        if decode == "gpu":
            raise UserError(f"--decode gpu needs the model on a CUDA GPU (it is on {device}) and torchvision "
                            "built for that torch (pip install torchvision==0.28.0); or pass --decode cpu.")
        return None
    return partial(nvjpeg, device)


def default_batch_size(device: str) -> int:
    """Large batches keep a GPU busy (ViT-S/16 runs thousands of images/s there); on a CPU batching
    gains nothing and the library's smaller default keeps memory and progress steps small."""
    return 256 if device == "cuda" else BuildOptions.batch_size


@dataclass
class Decoded:
    """A batch of rows turned into model inputs; what could not be used is counted by reason."""

    pixels: list[np.ndarray] = field(default_factory=list)  # each (S, S, 3) uint8
    meta: list[dict] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    first_row: int = 0
    last_row: int = -1

    def drop_known(self, seen: set[str], blocked: set[str]) -> None:
        """Leave out images whose pixels are already indexed (or repeated in this batch) and those
        removed from the index before, counting each; remember the rest."""
        keep = _keep_new([meta["hash"] for meta in self.meta], seen, blocked, self.skipped)
        self.pixels = [self.pixels[i] for i in keep]
        self.meta = [self.meta[i] for i in keep]


def _keep_new(hashes: list[str | None], seen: set[str], blocked: set[str], skipped: Counter) -> list[int]:
    """Positions of the images to keep, in order: not removed earlier and not seen before (then seen);
    the others are counted in `skipped` by reason."""
    keep = []
    for i, digest in enumerate(hashes):
        if digest is None:  # written before hashes were kept: nothing to compare
            keep.append(i)
        elif digest in blocked:
            skipped["removed earlier"] += 1
        elif digest in seen:
            skipped["duplicate"] += 1
        else:
            seen.add(digest)
            keep.append(i)
    return keep


@dataclass
class BuildReport:
    indexed: int  # images the index holds (a build) or images added (an add)
    skipped: Counter
    seconds: float
    resumed_from: int  # first source row of this run
    rows_this_run: int
    manifest: dict
    complete_before: bool = False  # the index was already finished: nothing was done


@dataclass
class Decoder:
    """Decode, face-check and resize a batch of rows. Plain data, so each decoding process gets a copy,
    which makes its own face gate and JPEG codec on first use (MediaPipe graphs cannot be shared or pickled).

    With a `codec` (nvJPEG), plain JPEGs are decoded on its device and stay there through the face gate, the
    resizing and the thumbnails; every other file is decoded by PIL and joins them. Content hashes never
    depend on the decoder: a plain JPEG is hashed by its image data (`hashes` JPEG_DATA), any other file by
    PIL's pixels; indexes made before JPEG_DATA (`hashes` None) hash every image by PIL's pixels."""

    input_size: int
    thumb_size: int
    max_pixels: int
    gate_factory: GateFactory | None  # None: keep photos of people
    hashes: str | None = JPEG_DATA
    codec: CodecFactory | None = None  # None: PIL decodes every image
    _gate: FaceGate | None = field(default=None, init=False, repr=False, compare=False)
    _codec: object = field(default=None, init=False, repr=False, compare=False)  # made on first use; False: none

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_gate": None, "_codec": None}

    def __call__(self, rows: list[Row]) -> Decoded:
        out = Decoded(first_row=rows[0].index, last_row=rows[-1].index)
        # The older hashes are of PIL's pixels, which nvJPEG does not reproduce to the bit: PIL decodes for them.
        codec = self._jpeg_codec() if self.hashes == JPEG_DATA else None
        loaded = self._load(rows, codec, out.skipped)  # (row, picture, plain JPEG bytes or None)
        if self.gate_factory is not None and loaded:
            self._gate = self._gate or self.gate_factory()
            pictures = [picture for _, picture, _ in loaded]
            if codec is not None and not isinstance(self._gate, TorchFaceGate):  # MediaPipe reads PIL images
                pictures = [Image.fromarray(_array(p)) for p in pictures]
            checks = self._gate.check_many(pictures)  # a batched gate checks them together
            if faces := sum(check.has_face for check in checks):
                out.skipped["face"] += faces
            loaded = [item for item, check in zip(loaded, checks) if not check.has_face]
        pictures = [picture for _, picture, _ in loaded]
        out.pixels = self._model_inputs(pictures, codec)
        for (row, picture, jpeg), thumbnail in zip(loaded, self._thumbnails(pictures, codec)):
            width, height = picture.size if codec is None else picture_size(picture)
            out.meta.append({
                "source_row": row.index, "width": width, "height": height, "label": row.label,
                "thumbnail": thumbnail,
                "hash": jpeg_data_hash(jpeg) if jpeg is not None else content_hash(picture if codec is None
                                                                                  else _array(picture)),
            })
        return out

    def _load(self, rows: list[Row], codec: Nvjpeg | None, skipped: Counter) -> list[tuple]:
        """The rows' images, in order: PIL images, or with a `codec` (3, H, W) tensors on its device; each with
        its bytes if it is a plain JPEG that JPEG_DATA hashes by them. What cannot be read is counted in
        `skipped` by reason."""
        sources = [row.image for row in rows]
        plain = [plain_jpeg(source, self.max_pixels) if self.hashes == JPEG_DATA else None for source in sources]
        if codec is not None:
            pictures = load_image_tensors(sources, codec.device, self.max_pixels, jpeg_decoder=codec.decode, plain=plain)
        else:
            pictures = [_loaded(source if jpeg is None else jpeg, self.max_pixels)  # a file read once
                        for source, jpeg in zip(sources, plain)]
        loaded = []
        for row, picture, jpeg in zip(rows, pictures, plain):
            if isinstance(picture, ImageError):
                skipped[picture.reason] += 1
            else:
                loaded.append((row, picture, jpeg))
        return loaded

    def _jpeg_codec(self):
        if self._codec is None:
            self._codec = (self.codec() if self.codec is not None else None) or False
        return self._codec or None

    def _model_inputs(self, pictures: list, codec: Nvjpeg | None) -> list[np.ndarray]:
        """Each picture resized to the model's input, (S, S, 3) uint8: PIL images here, tensors on their
        device and copied back together."""
        if codec is None or not pictures:
            return [prepare_image(p, self.input_size) for p in pictures]
        return list(prepare_pictures(pictures, self.input_size))

    def _thumbnails(self, pictures: list, codec: Nvjpeg | None) -> list[bytes | None]:
        """JPEG thumbnails: PIL's of PIL images, the codec's (nvJPEG) of tensors on its device."""
        if not self.thumb_size:
            return [None] * len(pictures)
        if codec is None or not pictures:
            return [make_thumbnail(p, self.thumb_size) for p in pictures]
        small = [resize_picture(p, thumbnail_size(picture_size(p), self.thumb_size)) for p in pictures]
        return codec.encode(small, THUMB_QUALITY)


def _loaded(source, max_pixels: int) -> Image.Image | ImageError:
    try:
        return load_image(source, max_pixels=max_pixels)
    except ImageError as e:
        return e


def _array(picture) -> np.ndarray:
    """(h, w, 3) uint8 pixels of a (3, H, W) tensor, in memory."""
    return picture.permute(1, 2, 0).cpu().numpy()


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_worker_decoder: Decoder | None = None  # this decoding process's copy, set when the process starts


def _start_worker(decoder: Decoder) -> None:
    global _worker_decoder
    _worker_decoder = decoder


def _decode_in_worker(rows: list[Row]) -> Decoded:
    return _worker_decoder(rows)


def _decoded(batches: Iterator[list[Row]], decoder: Decoder, workers: int) -> Iterator[Decoded]:
    """Decoded batches in source order, `workers` processes working a bounded distance ahead."""
    if workers <= 0:
        for batch in batches:
            yield decoder(batch)
        return
    # fork is cheap and the workers never touch torch; spawn where fork is unsafe (macOS), for the torch face
    # gate and for GPU decoding (after the model ran, torch hangs in a forked process, and CUDA cannot start there).
    torch_workers = gate_needs_spawn(decoder.gate_factory) or decoder.codec is not None
    method = "fork" if sys.platform.startswith("linux") and not torch_workers else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _start_worker, (decoder,)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_decode_in_worker, (batch,)))
            if len(pending) >= 2 * workers:  # bounded: a huge dataset is never queued whole
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass(frozen=True)
class ModelSpec:
    """How to load the build's model again in another process or on another machine: plain values."""

    model_id: str
    revision: str | None
    input_size: int
    batch_size: int

    @classmethod
    def of(cls, embedder: Embedder) -> "ModelSpec":
        return cls(embedder.model_id, embedder.revision, embedder.input_size, embedder.batch_size)

    def load(self, device: str) -> Embedder:
        return Embedder(self.model_id, device=device, input_size=self.input_size, batch_size=self.batch_size,
                        revision=self.revision)


@dataclass
class Work:
    """What is left of a run and the parts that do it: a distributor turns `ranges` into chunks."""

    source: Source
    embedder: Embedder
    decoder: Decoder
    writer: Writer
    ranges: list[tuple[int, int | None]]  # source rows no finished chunk covers, in order (None: to the end)
    options: BuildOptions
    seen: set[str]  # hashes indexed before ranges[0]: dropped before embedding (settle_chunks has the last word)
    blocked: set[str]  # hashes of images removed from the index, kept out


class Distributor(Protocol):
    """Runs a `Work` on one machine or many; each finished chunk is reported to `progress` as a Decoded
    (rows first_row..last_row, what was skipped), in any order."""

    def run(self, work: Work, progress: Callable[[Decoded], None] | None) -> None: ...


class LocalDistributor:
    """This machine: `options.workers` decoding processes, the model in this process, chunks in order."""

    def run(self, work: Work, progress: Callable[[Decoded], None] | None) -> None:
        options, writer = work.options, work.writer
        batches = (batch for start, stop in work.ranges
                   for batch in _batches(work.source.rows(start, stop), options.batch_size))
        buffer = ChunkBuffer(work.ranges[0][0])
        for decoded in _decoded(batches, work.decoder, options.workers):
            if decoded.first_row != buffer.row_end:  # a finished chunk lies between: never write across it
                buffer.flush(writer)
                buffer.row_start = buffer.row_end = decoded.first_row
            decoded.drop_known(work.seen, work.blocked)
            buffer.add(decoded, *embed_decoded(work.embedder, decoded, options.batch_size))
            if progress is not None:
                progress(decoded)
            if buffer.count >= options.chunk_size:
                buffer.flush(writer)
        buffer.flush(writer)


def embed_decoded(embedder: Embedder, decoded: Decoded, batch_size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """CLS (n, d) and patch (n, p, d) vectors of decoded images, `batch_size` at a time (None, None: none)."""
    if not decoded.pixels:
        return None, None
    features = Features.joined([embedder.embed_prepared(np.stack(decoded.pixels[i:i + batch_size]),
                                                        [(m["width"], m["height"]) for m in decoded.meta[i:i + batch_size]])
                                for i in range(0, len(decoded.pixels), batch_size)])
    return features.cls, features.patches


def build_index(source: Source, embedder: Embedder, out_dir: str, options: BuildOptions, progress=None,
                gate: GateFactory = FaceGate, rebuild: bool = False,
                distributor: Distributor | None = None) -> BuildReport:
    """Build (or resume building) the index folder `out_dir` from `source` and return a report.

    A finished index of the same source is left as it is (the report says so) unless `rebuild`; a
    rebuild replaces it in one step and keeps its removed images out. `gate` makes the face gate of
    each decoding process (used when `options.skip_faces`); `distributor` runs the work (default: here)."""
    out = Path(out_dir)
    with hold_lock(out):
        previous = read_manifest(out) if (out / MANIFEST).is_file() else None
        described = source.describe()
        if previous is not None and not rebuild:
            return _already_built(out, previous, described)
        build_info = {
            "model": embedder.describe(),
            "source": described,
            "skip_faces": options.skip_faces,
            "turned_faces": options.skip_faces and options.turned_faces,
            "thumb_size": options.thumb_size,
            "index_type": options.index_type,
            "patches": choose_layout(options.patches, source.num_rows, options.limit).describe(),
            "content_hash": JPEG_DATA,
        }
        keep, blocked = None, set()
        if previous is not None:  # --rebuild: a new index whose removed images stay out
            old = load_index(out)
            build_info["base_generation"] = old.generation
            blocked = set(old.removed_hashes)
            if blocked:  # they stay out only if hashed alike
                build_info["content_hash"] = old.manifest.get("content_hash")
            name = write_tombstones(out, old.generation + 1, np.full(len(blocked), -1), sorted(blocked))
            keep = {"removed": name, "removed_count": 0}
        begun = unfinished_run(out)
        if begun is not None and "content_hash" not in begun:  # begun before JPEGs were hashed by their data
            del build_info["content_hash"]
        writer = Writer(out, build_info)
        run = _embed_rows(source, embedder, writer, options, progress, gate, set(), blocked, distributor,
                          build_info.get("content_hash"))
        entry = {"action": "build", "time": now(), "source": 0, "images": writer.stored(),
                 "skipped": dict(writer.skipped())}
        manifest = writer.finalize({"history": [entry]}, options.index_type, keep)
    return BuildReport(manifest["count"], Counter(manifest["skipped"]), run.seconds, run.start, run.rows, manifest)


def add_to_index(source: Source, embedder: Embedder, folder: str, options: BuildOptions, progress=None,
                 gate: GateFactory = FaceGate, distributor: Distributor | None = None) -> BuildReport:
    """Add the rows of `source` to a finished index with its own model, patch layout, face policy and
    trained quantisers; images already in it (exact copies) or removed from it are skipped and counted."""
    folder = Path(folder)
    with hold_lock(folder):
        index = load_index(folder, embedder.describe())
        m = index.manifest
        if m["format_version"] == 1:
            raise IndexFolderError(f"{folder} is an index of format 1, which cannot grow; rebuild it with "
                                   "`python -m index_builder --rebuild ...` to add images to it.")
        sources, described = list(m["sources"]), source.describe()
        number = sources.index(described) if described in sources else len(sources)
        sources[number:number + 1] = [described]
        info = {"action": "add", "model": m["model"], "patches": m.get("patches"), "source": described,
                "base_generation": index.generation}
        options = replace(options, skip_faces=m.get("skip_faces", True), thumb_size=m.get("thumb_size", THUMB_SIDE),
                          turned_faces=m.get("turned_faces", False))
        writer = Writer(folder, info, number)
        run = _embed_rows(source, embedder, writer, options, progress, gate, index.hashes(),
                          set(index.removed_hashes), distributor, m.get("content_hash"))
        entry = {"action": "add", "time": now(), "source": number, "rows": run.end_row,
                 "images": writer.stored(), "skipped": dict(writer.skipped())}
        added = entry["images"]
        manifest = writer.finalize_addition(index, entry, sources)
    return BuildReport(added, Counter(entry["skipped"]), run.seconds, run.start, run.rows, manifest)


def _already_built(out: Path, manifest: dict, described: dict) -> BuildReport:
    """A finished index: nothing to do if it is of this source, else refuse to mix or replace silently."""
    first = (manifest.get("sources") or [manifest.get("source")])[0]
    if first != described:
        raise IndexFolderError(
            f"{out} already holds an index of {_name(first)}. Add {_name(described)} to it with "
            f"`python -m index_builder add --index {out} --dataset {described['dataset']}`, replace it "
            f"with --rebuild, or choose another --out.")
    return BuildReport(manifest["count"], Counter(), 0.0, 0, 0, manifest, complete_before=True)


def _name(source: dict | None) -> str:
    if not source or "dataset" not in source:
        return "another dataset"
    return f"{source['dataset']} [{source['split']}]"


@dataclass
class _Run:
    start: int  # first row this run read
    rows: int  # rows it read
    seconds: float
    end_row: int  # rows [0, end_row) of the source are done


def _embed_rows(source: Source, embedder: Embedder, writer: Writer, options: BuildOptions, progress,
                gate: GateFactory, known: set[str], blocked: set[str], distributor: Distributor | None,
                hashes: str | None) -> _Run:
    """Decode, check, embed and write the rows of `source` that no finished chunk covers, then settle the
    chunks; `known`: hashes already in the index (an add), made as `hashes` says (the index's "content_hash")."""
    started = time.perf_counter()
    if gate is FaceGate:  # the standard gate: MediaPipe, or its models batched in torch on a GPU
        gate = gate_factory(options.face_gate_backend, embedder.device)
    if options.skip_faces and not options.turned_faces:
        gate = partial(gate, turns=UPRIGHT)
    decoder = Decoder(embedder.input_size, options.thumb_size, options.max_pixels,
                      gate if options.skip_faces else None, hashes, jpeg_codec(options.decode, embedder.device, hashes))
    stop = source.num_rows if options.limit is None else min(options.limit, source.num_rows or options.limit)
    ranges = missing_ranges(writer.chunks(), stop)
    done_before = _rows_done(writer)
    if progress is not None and done_before:  # rows finished by earlier runs count as done
        progress(Decoded(skipped=writer.skipped(), first_row=0, last_row=done_before - 1))
    if ranges:
        seen = known | writer.hashes(before=ranges[0][0])
        work = Work(source, embedder, decoder, writer, ranges, options, seen, blocked)
        (distributor or LocalDistributor()).run(work, progress)
    settle_chunks(writer, known, blocked)
    chunks = writer.chunks()
    start = ranges[0][0] if ranges else stop or 0
    return _Run(start, _rows_done(writer) - done_before, time.perf_counter() - started,
                chunks[-1].row_end if chunks else 0)


def missing_ranges(chunks: list[Chunk], stop: int | None) -> list[tuple[int, int | None]]:
    """Row ranges of [0, stop) that no finished chunk covers, in order (stop None: a stream's unknown end)."""
    ranges, at = [], 0
    for chunk in chunks:
        if chunk.row_start > at:
            ranges.append((at, chunk.row_start))
        at = max(at, chunk.row_end)
    if stop is None or at < stop:
        ranges.append((at, stop))
    return ranges


def _rows_done(writer: Writer) -> int:
    return sum(c.row_end - c.row_start for c in writer.chunks())


def settle_chunks(writer: Writer, known: set[str], blocked: set[str]) -> None:
    """Drop from the finished chunks, in source order, what a run in order drops as it goes: images
    already `known`, seen at an earlier row, or removed before. Chunks written out of order (by a
    distributed run, or across runs) then hold what one run in order would have kept."""
    seen = set(known)
    for chunk in writer.chunks():
        dropped = Counter()
        keep = _keep_new(chunk_hashes(chunk), seen, blocked, dropped) if chunk.count else []
        if len(keep) < chunk.count:
            writer.filter_chunk(chunk, np.array(keep, np.int64), dropped)


class ChunkBuffer:
    """Features of consecutive rows waiting to be written as one chunk (by any distributor)."""

    def __init__(self, row_start: int):
        self.row_start = self.row_end = row_start
        self._reset()

    def _reset(self) -> None:
        self.cls, self.patches, self.meta, self.skipped = [], [], [], Counter()

    @property
    def count(self) -> int:
        return len(self.meta)

    def add(self, decoded: Decoded, cls, patches) -> None:
        if cls is not None:
            self.cls.append(cls)
            self.patches.append(patches)
        self.meta += decoded.meta
        self.skipped += decoded.skipped
        self.row_end = decoded.last_row + 1

    def flush(self, writer: Writer) -> None:
        if self.row_end == self.row_start:
            return
        cls = np.concatenate(self.cls) if self.cls else np.zeros((0, 0), np.float32)
        patches = np.concatenate(self.patches) if self.patches else np.zeros((0, 0, 0), np.float32)
        writer.add_chunk(self.row_start, self.row_end, cls, patches, self.meta, self.skipped)
        self.row_start = self.row_end
        self._reset()
