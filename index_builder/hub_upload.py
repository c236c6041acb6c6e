"""Upload a finished index folder to the Hugging Face Hub as a dataset repo, for `--index hf://USER/REPO`."""
from __future__ import annotations

from pathlib import Path

from dino_demo.errors import HubUnreachable, UserError
from dino_demo.hub import hub_reachable
from dino_demo.index import BUILD_DIR, MANIFEST

INDEX_FILES = [MANIFEST, "seg-*/**", "trained-*", "removed-*", "*.faiss", "*.parquet", "*.npy"]


def upload_index(folder: str | Path, repo: str, private: bool = False) -> str:
    """Create (if needed) the dataset repo `repo` and upload the index files; returns the repo's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{folder} is not a finished index (no {MANIFEST}); finish the build before uploading it.")
    if repo.count("/") != 1:
        raise UserError(f"'{repo}' is not a repo id; write it as USER/REPO.")
    if not hub_reachable():  # require_hub's message speaks of downloading; this is an upload
        raise HubUnreachable(f"Cannot reach the Hugging Face Hub to upload the index to {repo}; "
                             f"the index is complete in {folder}: where there is internet, upload it with "
                             f"`hf upload --repo-type dataset {repo} {folder}`.")
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo, repo_type="dataset",
                      ignore_patterns=[f"{BUILD_DIR}/**", ".*"],  # scratch chunks and temp files stay local
                      # an earlier upload's index files go: a removed image must not stay readable on the Hub
                      delete_patterns=INDEX_FILES,
                      commit_message="Upload DINO image index")
    return f"https://huggingface.co/datasets/{repo}"
