"""Checkpoints that hold everything a resume needs: safetensors weights plus a weights_only state.

    <dir>/model.safetensors   policy weights (shared tensors, e.g. tied embeddings, handled)
    <dir>/state.pt            optimizer, scheduler, DARO weights, RNG states, data position, step
    <dir>/meta.json           step and run id, human-readable

`save_trainer` / `load_trainer` write and restore a `loop.Trainer`'s whole state (the policy, under FSDP gathered to
full weights; the optimizer; DARO's weights; every rank's sampling stream; the data position). Written to a
temporary folder then renamed, so a kill mid-write never leaves a half checkpoint
where `latest()` would find it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from daro_lab import distributed as dp
from daro_lab.config import ConfigError
from daro_lab.models.tiny import refused_pickle_reason
from daro_lab.trainer import fsdp


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


def save_checkpoint(
    directory: str | Path, model: torch.nn.Module | dict[str, torch.Tensor], state: dict[str, Any], meta: dict
) -> Path:
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


class CheckpointError(ConfigError):
    """A checkpoint that is missing, corrupt, tampered with or not daro-lab's; the message names its folder.
    (A ConfigError: `daro-lab train --resume` exits 2 before the run changes.)"""

    def __init__(self, directory: str | Path, why: str):
        super().__init__(f"checkpoint {directory} is not a valid daro-lab checkpoint: {why}")


# what every checkpoint's state.pt holds (Trainer.state_dict plus the RNG states)
STATE_KEYS = ("step", "cursor", "order", "optimizer", "weights", "rollout_gen", "data_gen", "rng")


def load_checkpoint(directory: str | Path, model: torch.nn.Module | None) -> dict[str, Any]:
    """Load weights into `model` (None: leave them, see `load_weights`) and return the state (RNG states are
    restored here). Anything wrong with the files: `CheckpointError` naming the folder and what is wrong;
    state.pt is only ever read weights-only (no code in it can run)."""
    directory = Path(directory)
    if not (directory / "state.pt").is_file() or not (directory / "model.safetensors").is_file():
        raise CheckpointError(directory, "model.safetensors or state.pt is missing")
    if model is not None:
        try:
            load_model(model, str(directory / "model.safetensors"))
        except (SafetensorError, RuntimeError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(directory, f"model.safetensors: {_first_line(e)}") from None
    if not zipfile.is_zipfile(directory / "state.pt"):  # what torch.save writes
        raise CheckpointError(
            directory, "state.pt is not a complete torch.save file (no zip archive: truncated or overwritten)"
        )
    try:
        state = torch.load(directory / "state.pt", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(directory, "state.pt " + refused_pickle_reason(e)) from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(directory, f"state.pt cannot be read ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(state, dict):
        raise CheckpointError(directory, f"state.pt holds a {type(state).__name__}, not a dict")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(directory, f"state.pt lacks {', '.join(map(repr, missing))}")
    try:
        set_rng_state(state.pop("rng"))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(directory, f"state.pt: bad RNG states ({type(e).__name__}: {_first_line(e)})") from None
    return state


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]


def load_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The checkpoint's weights as a state dict on CPU (tied parameters once); CheckpointError if unreadable."""
    try:
        return load_file(str(Path(directory) / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(directory, f"model.safetensors: {_first_line(e)}") from None


def write_pointer(root: Path, directory: Path) -> None:
    """Record the newest checkpoint (atomic rename, so a reader never sees half a file)."""
    tmp = root / "latest.tmp"
    tmp.write_text(directory.name)
    os.replace(tmp, root / "latest")


def latest(root: str | Path) -> Path | None:
    """The checkpoint the `latest` pointer names, if it is there (see `resume_point` for what a resume uses)."""
    root = Path(root)
    p = root / "latest"
    if not p.is_file():
        return None
    d = root / p.read_text().strip()
    return d if _intact(d) else None


_STEP_DIR = re.compile(r"step_(\d{6,})")


def _intact(d: Path) -> bool:
    return (d / "state.pt").is_file() and (d / "model.safetensors").is_file()


def resume_point(root: str | Path) -> tuple[Path | None, str | None]:
    """(the checkpoint a resume continues from, a note when it is not the one `latest` names).

    The `latest` pointer's checkpoint when it is intact, else the newest intact `step_NNNNNN` folder under
    `root` (a pointer naming a missing or half-copied step must not rewind the run to step 0), else None."""
    root = Path(root)
    found = latest(root)
    if found is not None:
        return found, None
    steps = (
        sorted((int(m.group(1)), d) for d in root.glob("step_*") if (m := _STEP_DIR.fullmatch(d.name)) and _intact(d))
        if root.is_dir()
        else []
    )
    if not steps:
        return None, None
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    why = f"its pointer {pointer} names {named}, which is missing or incomplete" if named else f"{pointer} is missing"
    return steps[-1][1], f"resuming from {steps[-1][1]}, the newest intact checkpoint under {root}: {why}"


# ---------------------------------------------------------------------------------------------
# A trainer's state


def trainer_state(tr) -> dict[str, Any]:
    """Everything a resume of the `loop.Trainer` tr needs; data-parallel: collective (each rank's sampling stream is
    gathered)."""
    gens = dp.gather_objects(tr.rollout_gen.get_state(), tr.dist)
    return {
        "step": tr.step,
        "cursor": tr.cursor,
        "order": tr.order,
        "optimizer": fsdp.optimizer_state(_state_root(tr), tr.opt) if tr.fsdp else tr.opt.state_dict(),
        "weights": tr.weights.state_dict() if tr.weights is not None else {},
        "rollout_gen": gens[0],
        "data_gen": tr.data_gen.get_state(),
        "world_size": tr.dist.world_size,
        "rollout_gens": torch.stack(gens),
    }


def save_trainer(tr, directory, meta: dict | None = None):
    """Write a checkpoint (rank 0 writes; every rank must call, after checking the replicas agree)."""
    # FSDP: the shards differ by design; the full generation copies (if any) must agree
    replicas = [tr.gen.model] if tr.gen is not None else [] if tr.fsdp else [tr.model]
    dp.check_in_sync(replicas + ([tr.weights] if tr.weights is not None else []), tr.dist)
    state = trainer_state(tr)
    weights = fsdp.model_state(tr.policy.forward, tr.model) if tr.fsdp else tr.model  # FSDP: gathered, fp32
    if not tr.dist.is_main:
        return None
    path = save_checkpoint(directory, weights, state, {"step": tr.step, **(meta or {})})
    for h in tr.hooks:
        h.on_checkpoint(tr.step)
    return path


def load_trainer(tr, directory) -> None:
    """Restore the state saved by `save` (every rank). A checkpoint that is corrupt, tampered with or not this
    run's: `CheckpointError` naming it (load_checkpoint reads state.pt weights-only)."""
    st = load_checkpoint(directory, None if tr.fsdp else tr.model)
    if tr.fsdp:  # every rank reads the full weights and keeps its shards
        fsdp.load_model_state(tr.policy.forward, tr.model, load_weights(directory))
    saved_world = int(st.get("world_size", 1))
    if saved_world != tr.dist.world_size:
        raise ConfigError(
            f"checkpoint {directory} was written by {saved_world} data-parallel processes; "
            f"resume it with as many (this is {tr.dist.world_size})"
        )
    try:
        step, cursor, order = int(st["step"]), int(st["cursor"]), st["order"]
        if not isinstance(order, torch.Tensor) or order.numel() != len(tr.train_set) or not 0 <= cursor <= len(order):
            raise ValueError(
                f"data position (cursor {cursor}, order of {getattr(order, 'numel', lambda: '?')()} "
                f"prompts) does not fit this run's {len(tr.train_set)} training prompts"
            )
        if tr.fsdp:
            fsdp.load_optimizer_state(_state_root(tr), tr.opt, st["optimizer"])
        else:
            tr.opt.load_state_dict(st["optimizer"])
        if tr.weights is not None:
            tr.weights.load_state_dict(st["weights"])
        # clone: a row of the stacked states is a view at an offset, which Generator.set_state misreads
        tr.rollout_gen.set_state(
            st["rollout_gens"][tr.dist.rank].clone() if "rollout_gens" in st else st["rollout_gen"]
        )
        tr.data_gen.set_state(st["data_gen"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise CheckpointError(directory, f"its state does not fit this run ({type(e).__name__}: {e})") from None
    tr.step, tr.cursor, tr.order = step, cursor, order
    tr._sync_engine()


def _state_root(tr) -> torch.nn.Module:
    """FSDP: one module holding every parameter the optimizer steps, for the full optimizer state dict."""
    mods = {"policy": tr.policy.forward}
    if tr.weights is not None and tr.method.weights == "learned":
        mods["weights"] = tr.weights
    return torch.nn.ModuleDict(mods)
