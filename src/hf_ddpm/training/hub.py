"""Pushing the output folder to the Hugging Face Hub. The token comes from huggingface_hub's usual sources
(`HF_TOKEN`, `hf auth login`); it is never printed, logged or written."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import create_repo, upload_folder

# Checkpoints are for resuming here, logs are still being written, and dot-entries are in-flight temporaries.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", ".*", "*/.*", "*.tmp", "logs/*"]


def create_hub_repo(output_dir: str | os.PathLike, hub_model_id: str | None, private: bool) -> str:
    """Create the model repo if needed (`exist_ok`) and return its full id (`namespace/name`)."""
    name = hub_model_id or Path(output_dir).resolve().name
    return create_repo(name, private=private, exist_ok=True, repo_type="model").repo_id


def push_folder(output_dir: str | os.PathLike, repo_id: str, commit_message: str) -> str:
    """Upload the pipeline, model card and sample grids of `output_dir`; returns the commit URL."""
    info = upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(output_dir),
        commit_message=commit_message,
        ignore_patterns=PUSH_IGNORE_PATTERNS,
        repo_type="model",
    )
    return info.commit_url
