"""Where the app's index comes from: a folder, a Hub dataset repo (hf://USER/REPO), or the bundled
collection, indexed once into the cache with the app's own model."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

from dino_demo.backbones import short_name
from dino_demo.errors import UserError, first_line
from dino_demo.hub import require_hub
from dino_demo.index import MANIFEST
from dino_demo.model import Embedder

from .build import BuildOptions, build_index
from .source import open_source

HUB_PREFIX = "hf://"
BuildProgress = Callable[[int, int], None]  # (images done, images in all)


def locate_index(location: str) -> Path:
    """The index folder `location` names: a folder, or hf://USER/REPO (downloaded once, then cached).
    With no location the app serves the bundled collection: `build_default_index`."""
    if location.startswith(HUB_PREFIX):
        return download_index(location[len(HUB_PREFIX):])
    return Path(location).expanduser()


def download_index(repo: str) -> Path:
    """The local copy of an index uploaded as a dataset repo; reuses the hub cache when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    if repo.count("/") != 1:
        raise UserError(f"'{HUB_PREFIX}{repo}' is not a hub dataset repo; write it as {HUB_PREFIX}USER/REPO.")
    try:
        return Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass  # not cached yet
    require_hub(f"the index {repo}",
                f"download it where there is internet (`hf download --repo-type dataset {repo} "
                f"--local-dir indexes/{repo.split('/')[-1]}`) and pass that folder as --index.")
    try:
        return Path(snapshot_download(repo, repo_type="dataset"))
    except HfHubHTTPError as e:
        raise UserError(f"Could not download the index {repo}: {first_line(e)} Check the name and your access.") from None


def default_index_dir(cache_dir: Path, model_id: str, input_size: int) -> Path:
    """One cached index of the default collection per model and input size: readable name, hash for uniqueness."""
    digest = hashlib.sha1(f"{model_id}@{input_size}".encode()).hexdigest()[:8]
    return Path(cache_dir) / "default-index" / f"{short_name(model_id)}-{input_size}px-{digest}"


def build_default_index(embedder: Embedder, cache_dir: Path, collection: Path, skip_faces: bool = True,
                        progress: BuildProgress | None = None) -> Path:
    """Index `collection` into the cache the first time (resuming a killed build); later calls reuse it."""
    out = default_index_dir(cache_dir, embedder.model_id, embedder.input_size)
    if (out / MANIFEST).is_file():
        return out
    source = open_source(str(collection))
    total = source.num_rows or 0
    options = BuildOptions(batch_size=16, workers=0, chunk_size=64, skip_faces=skip_faces)

    def report(decoded) -> None:
        if progress is not None:
            progress(decoded.last_row + 1, total)

    out.parent.mkdir(parents=True, exist_ok=True)
    build_index(source, embedder, str(out), options, report)
    return out
