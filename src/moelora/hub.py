"""Adapters on the Hugging Face Hub, and the base model alone for a while.

- ``from_pretrained(model, "user/repo" | folder, revision=None)``: ``load_adapter`` from a local folder or
  a Hub repository (only the adapter files are downloaded: config, weights, model card);
- ``push_to_hub(model, "user/repo")``: ``save_adapter`` into a temporary folder, then one commit of it to the
  repository (created if missing);
- ``disable_adapter(model)``: a context in which every MoE-LoRA layer computes its base module alone.

The Hub functions need ``huggingface_hub`` (installed with transformers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from .errors import AdapterNotFoundError
from .extras import MissingExtraError
from .inject import moelora_layers

ADAPTER_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]


def _hub() -> Any:
    if importlib.util.find_spec("huggingface_hub") is None:
        raise MissingExtraError("adapters on the Hugging Face Hub need huggingface_hub: pip install huggingface_hub")
    import huggingface_hub

    return huggingface_hub


def from_pretrained(model: nn.Module, name_or_path: str | os.PathLike, *, revision: str | None = None,
                    adapter_dtype: torch.dtype | None = None, token: str | None = None) -> nn.Module:
    """``load_adapter(model, folder)`` where ``name_or_path`` is a local adapter folder or a Hub repository
    id (``"user/name"``, at ``revision``). Returns ``model``, wrapped."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_adapter(model, path, adapter_dtype=adapter_dtype)
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:  # a path, and not a folder
        raise AdapterNotFoundError(f"{name_or_path} is neither an adapter folder nor a Hub repository id (user/name)")
    hub = _hub()
    folder = hub.snapshot_download(repo_id=str(name_or_path), revision=revision, allow_patterns=ADAPTER_FILES,
                                   token=token)
    return load_adapter(model, folder, adapter_dtype=adapter_dtype)


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None, token: str | None = None,
                revision: str | None = None, commit_message: str = "Upload MoE-LoRA adapter",
                training: dict | None = None) -> Any:
    """Save the adapter (with its model card; ``training`` as in ``save_adapter``) and upload it to
    ``repo_id`` in one commit, creating the repository when it does not exist. Returns the commit info."""
    hub = _hub()
    api = hub.HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="moelora-push-") as tmp:
        save_adapter(model, tmp, training=training)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message, revision=revision,
                                 repo_type="model")


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context every MoE-LoRA layer returns its base module's output alone (the experts and
    routers are skipped, their weights untouched); afterwards each layer is as it was. ``modules_to_save``
    keep their trained values (they are trained in place)."""
    layers = [layer for _, layer in moelora_layers(model)]
    if not layers:
        raise AdapterNotFoundError("disable_adapter: the model has no MoE-LoRA layer (moelora.wrap it first)")
    before = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.adapter_enabled = enabled
