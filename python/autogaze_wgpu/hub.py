"""Finding a model's files: a local directory, or a Hugging Face repo id."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

MODEL_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def resolve_model_dir(path_or_repo_id: str | os.PathLike) -> Path:
    """Returns a local directory holding the model files.

    A path that exists is used as is. Otherwise a string shaped like ``owner/name`` is looked
    up with ``huggingface_hub`` when it is installed (honouring its cache and
    ``HF_HUB_OFFLINE``); without it, the error says how to get the files.
    """
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    if p.is_file() and p.name in MODEL_FILES:
        return p.parent
    s = str(path_or_repo_id)
    looks_like_repo = s.count("/") == 1 and not s.startswith((".", "/", "~")) and not p.exists()
    if not looks_like_repo:
        raise ConfigError(f"model directory {s!r} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(
            f"{s!r} is not a local directory and huggingface_hub is not installed. Either "
            f"`pip install autogaze-wgpu[hub]`, or download {', '.join(MODEL_FILES)} from "
            f"https://huggingface.co/{s} into a folder and pass that folder's path."
        ) from None
    try:
        return Path(snapshot_download(repo_id=s, allow_patterns=list(MODEL_FILES)))
    except Exception as e:  # network, auth, offline mode without a cached copy, ...
        raise ConfigError(
            f"could not get {s!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
            "With HF_HUB_OFFLINE=1 only cached snapshots are used."
        ) from e
