"""The Ray Data distributor (`--ray`): the collection's shards read in parallel, decoded and face-checked
by CPU tasks, embedded by actors (one per GPU; CPU actors without one) that write the same chunks a
local run writes. The builder's finalize step then runs once, here, after every shard.

Imported only with `--ray`: nothing else in the builder needs Ray.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import ray
import ray.data
import ray.exceptions

import dino_demo
from dino_demo.errors import UserError, first_line
from dino_demo.index_writer import Writer

from .build import ChunkBuffer, Decoded, Decoder, ModelSpec, Work, _batches, embed_decoded
from .source import Shard, Source, SourceSpec

SHARDS_PER_CPU = 4  # more pieces than workers, so a slow one does not hold up the end of a run


class RayUnreachable(UserError):
    """No Ray cluster at the address given."""


def connect(address: str) -> dict:
    """Join the Ray cluster at `address` ("auto": the one this machine belongs to, else a new local one)
    and return its resources. Our two packages travel to the workers; the libraries must be there."""
    if not ray.is_initialized():
        if address != "auto" and not _answers(address):  # else Ray retries for minutes, printing as it goes
            raise RayUnreachable(f"Nothing answers at {address}: start the cluster there with `ray start --head` "
                                 "(it prints the address to pass), or pass --ray auto to run on this machine.")
        packages = [str(Path(dino_demo.__file__).parent), str(Path(__file__).parent)]
        try:
            ray.init(address=None if address == "auto" else address, logging_level=logging.WARNING,
                     log_to_driver=False, runtime_env={"py_modules": packages})
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            raise RayUnreachable(f"Cannot reach a Ray cluster at {address} ({first_line(e)}): start it with "
                                 "`ray start --head` there, or pass --ray auto to run on this machine.") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # its plan and timings are not the user's concern
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": ours is shown
    return ray.cluster_resources()


def _answers(address: str, seconds: float = 5.0) -> bool:
    """Whether something listens at a Ray address (HOST:PORT or ray://HOST:PORT)."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=seconds):
            return True
    except (OSError, ValueError):
        return False


@dataclass
class ChunkDone(Decoded):
    """A chunk written by the cluster, as progress sees it, with the processes that made it."""

    reader: int = 0  # process id of the task that read and decoded it
    writer: int = 0  # process id of the actor that embedded and wrote it


@dataclass(frozen=True)
class Piece:
    """One task's share: rows of one shard that no finished chunk covers."""

    shard: Shard
    ranges: tuple[tuple[int, int], ...]


class RayDistributor:
    """Runs a build's `Work` on the Ray cluster this process is connected to (`connect`)."""

    def run(self, work: Work, progress: Callable[[Decoded], None] | None) -> None:
        spec = work.source.spec
        if spec is None:
            raise UserError("A Ray build opens the dataset on every worker: open it with open_source().")
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
        pieces = _plan(work, spec, cpus)
        if pieces:
            _follow(_pipeline(work, spec, pieces, gpus), progress)


def _pipeline(work: Work, spec: SourceSpec, pieces: list[Piece], gpus: int) -> "ray.data.Dataset":
    """Pieces -> read and decoded chunks (CPU tasks) -> embedded and written chunks (actors), as Ray Data runs it."""
    ray.data.DataContext.get_current().enable_progress_bars = False  # the command's own bar counts chunks
    known = ray.put((work.seen, work.blocked)) if work.seen or work.blocked else None
    data = ray.data.from_items([{"piece": pickle.dumps(p)} for p in pieces], override_num_blocks=len(pieces))
    with warnings.catch_warnings():  # max_retries has no named parameter yet in Ray 2.60
        warnings.simplefilter("ignore", DeprecationWarning)
        # Retried without end when a worker dies; the differing remote args also keep Ray Data from fusing
        # the decoding into the embedding actors, which would leave CPUs idle on a machine without a GPU.
        decoded = data.flat_map(_read_and_decode, num_cpus=1, max_retries=-1, fn_kwargs={
            "source": spec, "decoder": work.decoder, "chunk_rows": work.options.chunk_size, "known": known})
    # One model per GPU; without GPUs one per machine, on all its cores, as a local build runs it
    # (a model per core would hold as many copies and leave none for decoding).
    pool = ray.data.ActorPoolStrategy(size=gpus or sum(1 for node in ray.nodes() if node["Alive"]))
    return decoded.map_batches(
        ChunkWriter, batch_size=1, compute=pool, num_cpus=1, num_gpus=1 if gpus else 0,
        fn_constructor_kwargs={  # Ray Data restarts a dead actor and retries its chunk, without end
            "model": ModelSpec.of(work.embedder), "writer": work.writer, "batch_size": work.options.batch_size})


def _follow(written: "ray.data.Dataset", progress: Callable[[Decoded], None] | None) -> None:
    """Run the pipeline to its end here, reporting each chunk written; a worker's UserError stops it in one line."""
    rows = iter(written.iter_rows())
    try:
        for done in rows:
            if done["error"]:
                raise pickle.loads(done["error"])
            if progress is not None:
                progress(ChunkDone(skipped=Counter(json.loads(done["skipped"])), first_row=done["row_start"],
                                   last_row=done["row_end"] - 1, reader=done["reader"], writer=done["writer"]))
    except Exception as e:
        if (cause := _user_error(e)) is not None:  # e.g. a worker cannot open the dataset: say so, in one line
            raise type(cause)(first_line(cause)) from None  # without the retry advice Ray adds to it
        raise
    finally:
        rows.close()  # stopped (Ctrl-C, an error): the cluster stops too, writing nothing after this run


def _user_error(error: BaseException | None) -> UserError | None:
    """The UserError a worker raised, under the exceptions Ray wraps it in (some of them UserErrors too,
    with Ray's advice added), if that is what stopped the run."""
    found = None
    while error is not None:
        if isinstance(error, UserError):
            found = error
        error = getattr(error, "cause", None) or error.__cause__
    return found


def _plan(work: Work, spec: SourceSpec, cpus: int) -> list[Piece]:
    """The shards of the rows still to do, each with its rows no finished chunk covers."""
    source, stop = work.source, work.ranges[-1][1]
    if source.num_rows is not None:
        rows_per_shard = min(work.options.chunk_size,
                             max(work.options.batch_size, -(-stop // (SHARDS_PER_CPU * cpus))))
        shards = source.shards(stop, rows_per_shard)
    else:
        shards = source.shards(stop, 0, _stream_sizes(spec, source.stream_shards(), cpus))
    pieces = []
    for shard in shards:
        mine = tuple((max(a, shard.first_row), min(b or shard.end_row, shard.end_row)) for a, b in work.ranges)
        mine = tuple((a, b) for a, b in mine if a < b)
        if mine:
            pieces.append(Piece(shard, mine))
    return pieces


def _stream_sizes(spec: SourceSpec, shards: int, parallel: int) -> Iterator[int]:
    """Rows in each of a stream's shards, counted on the cluster `parallel` shards at a time (the caller
    stops asking once it has the rows it needs)."""
    for first in range(0, shards, parallel):
        yield from ray.get([_count_shard.remote(spec, i) for i in range(first, min(first + parallel, shards))])


@ray.remote(max_retries=-1)
def _count_shard(spec: SourceSpec, index: int) -> int:
    return _open(spec).count_stream_shard(index)


# Kept for the life of a worker process, which runs many tasks: opening a source reads the dataset's
# files, and a decoder makes its face gate on first use.
_sources: dict[SourceSpec, Source] = {}
_decoders: dict[bytes, Decoder] = {}


def _open(spec: SourceSpec) -> Source:
    if spec not in _sources:
        _sources[spec] = spec.open()
    return _sources[spec]


def _same_decoder(decoder: Decoder) -> Decoder:
    return _decoders.setdefault(pickle.dumps(decoder), decoder)


def _read_and_decode(item: dict, source: SourceSpec, decoder: Decoder, chunk_rows: int, known) -> Iterator[dict]:
    """A Ray task: read one piece from its shard alone and decode it, one chunk of rows at a time."""
    piece: Piece = pickle.loads(item["piece"])
    seen, blocked = ray.get(known) if known is not None else (set(), set())
    decoder = _same_decoder(decoder)
    for start, stop in piece.ranges:
        for rows in _batches(_open(source).shard_rows(piece.shard, start, stop), chunk_rows):
            decoded = decoder(rows)
            decoded.drop_known(set(seen), blocked)  # early, to spare the model; settle_chunks decides
            yield {"decoded": decoded, "reader": os.getpid()}


class ChunkWriter:
    """A Ray actor: loads the model once, then embeds decoded chunks and writes each as a finished chunk."""

    def __init__(self, model: ModelSpec, writer: Writer, batch_size: int):
        if not ray.get_gpu_ids():
            import torch

            torch.set_num_threads(os.cpu_count() or 1)  # Ray gives a one-CPU actor one thread
        self.writer, self.batch_size, self.error = writer, batch_size, None
        try:
            self.embedder = model.load("cuda" if ray.get_gpu_ids() else "cpu")
        except UserError as e:  # e.g. no such model on this machine; Ray passes an actor's errors on only as text
            self.error = e

    def __call__(self, batch: dict) -> dict:
        decoded: Decoded = batch["decoded"][0]
        start, end = decoded.first_row, decoded.last_row + 1
        if self.error is None and not self.writer.chunk_dir(start, end).exists():  # else done by a killed attempt
            buffer = ChunkBuffer(start)
            buffer.add(decoded, *embed_decoded(self.embedder, decoded, self.batch_size))
            buffer.flush(self.writer)
        return {"row_start": [start], "row_end": [end], "skipped": [json.dumps(dict(decoded.skipped))],
                "reader": [int(batch["reader"][0])], "writer": [os.getpid()],
                "error": [pickle.dumps(self.error) if self.error else b""]}  # for the driver to raise
