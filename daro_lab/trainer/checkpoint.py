"""Checkpoints that hold everything a resume needs: safetensors weights plus a weights_only state.

    <dir>/model.safetensors   policy weights (shared tensors, e.g. tied embeddings, handled)
    <dir>/state.pt            optimizer, scheduler, DARO weights, RNG states, data position, step
    <dir>/meta.json           step and run id, human-readable

Written to a temporary folder then renamed, so a kill mid-write never leaves a half checkpoint
where `latest()` would find it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": [list(random.getstate()[1]), random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    internal, version, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(directory: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, Any],
                    meta: dict) -> Path:
    """Write a checkpoint atomically to `directory` (replacing one that is there).

    model: the policy, or its full state dict with tied parameters once (FSDP gathers one, `fsdp.model_state`).
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if isinstance(model, dict):
        save_file(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_model(model, str(tmp / "model.safetensors"))
    torch.save({**state, "rng": rng_state()}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def load_checkpoint(directory: str | Path, model: torch.nn.Module | None) -> dict[str, Any]:
    """Load weights into `model` (None: leave them, see `load_weights`) and return the state (RNG states are
    restored here)."""
    directory = Path(directory)
    if not (directory / "state.pt").is_file() or not (directory / "model.safetensors").is_file():
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    if model is not None:
        load_model(model, str(directory / "model.safetensors"))
    state = torch.load(directory / "state.pt", weights_only=True)
    set_rng_state(state.pop("rng"))
    return state


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as a state dict on CPU (tied parameters once)."""
    return load_file(str(Path(directory) / "model.safetensors"))


def checkpoint_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "meta.json").read_text())


def write_pointer(root: Path, directory: Path) -> None:
    """Record the newest checkpoint (atomic rename, so a reader never sees half a file)."""
    tmp = root / "latest.tmp"
    tmp.write_text(directory.name)
    os.replace(tmp, root / "latest")


def latest(root: str | Path) -> Path | None:
    root = Path(root)
    p = root / "latest"
    if not p.is_file():
        return None
    d = root / p.read_text().strip()
    return d if (d / "state.pt").is_file() else None
