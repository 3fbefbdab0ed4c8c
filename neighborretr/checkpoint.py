"""Training checkpoints that are written atomically and loaded without unpickling arbitrary objects.

A checkpoint is a folder `checkpoints/step_<8-digit step>` holding

    model.safetensors   the TrainStep's weights ("model."-prefixed retrieval model)         safetensors
    training_state.pt   optimiser, schedule, gradient scaler, objective (memory bank)       torch, weights_only=True
    rng_<rank>.json     each process's torch / CUDA / numpy / Python random states          JSON
    loop.json           the loop position and selection record (TrainState), written last  JSON

It is written under `step_<n>.tmp` and renamed when every file is complete, so a kill during a save leaves
only a `.tmp` folder, which lookups skip with a warning. Nothing here calls `pickle` on a file: a crafted
`training_state.pt` is refused by `weights_only=True` before any of its objects is built.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

FORMAT = 1
REQUIRED = ("model.safetensors", "training_state.pt", "loop.json")
PREFIX = "step_"
PARTIAL = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded into this run (incomplete, unsafe, or of another model)."""


def step_of(path: Path) -> int:
    """The optimiser step in a checkpoint folder's name (`step_00000012` -> 12)."""
    return int(path.name[len(PREFIX) :])


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / name).is_file() for name in REQUIRED)


def checkpoint_dirs(run_dir: Path, warn: bool = False) -> list[Path]:
    """The run's complete checkpoints, lowest step first; incomplete folders (an interrupted save, an older
    format) are skipped, with a warning naming them when `warn`."""
    folder = Path(run_dir) / "checkpoints"
    found, skipped = [], []
    for path in folder.glob(f"{PREFIX}*"):
        digits = path.name[len(PREFIX) :]
        if digits.isdigit() and is_complete(path):
            found.append(path)
        elif path.is_dir():
            skipped.append(path)
    if warn and skipped:
        log.warning(
            "skipping incomplete checkpoint folder(s) (an interrupted save, or written by an older version): %s",
            ", ".join(str(p) for p in sorted(skipped)),
        )
    return sorted(found, key=step_of)


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state().tolist(), "numpy": _numpy_state(), "python": _python_state()}
    if device.type == "cuda":  # this process's own GPU generator (dropout draws there)
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def _numpy_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}


def _python_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)
    n = state["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(
    accelerator: Accelerator, step: nn.Module, optimizer, scheduler, state, run_dir: Path, keep: int
) -> Path:
    """Writes the checkpoint of `state.global_step` atomically (see the module docstring); keeps the newest `keep`
    (0: all). Every process takes part. Returns the folder."""
    folder = Path(run_dir) / "checkpoints"
    final = folder / f"{PREFIX}{state.global_step:08d}"
    partial = final.with_name(final.name + PARTIAL)
    _on_main(accelerator, lambda: _fresh_folder(partial))
    weights = accelerator.get_state_dict(step)  # every rank: sharded setups assemble the full dict here
    (partial / f"rng_{accelerator.process_index}.json").write_text(json.dumps(_rng_state(accelerator.device)))

    def write_and_publish():
        save_file({k: v.contiguous() for k, v in weights.items()}, str(partial / "model.safetensors"))
        objective = accelerator.unwrap_model(step).objective
        training = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "objective": objective.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        torch.save(training, partial / "training_state.pt")
        loop = {"format": FORMAT, "num_processes": accelerator.num_processes, "state": state.state_dict()}
        (partial / "loop.json").write_text(json.dumps(loop, indent=1))
        # The same step can be saved twice (a step-interval save, then the end of the epoch): replace it.
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
        if keep > 0:
            for stale in checkpoint_dirs(run_dir)[:-keep]:
                shutil.rmtree(stale, ignore_errors=True)

    _on_main(accelerator, write_and_publish)
    return final


def _fresh_folder(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _on_main(accelerator: Accelerator, work) -> None:
    """Runs `work` on the main process and then lets every process go on, or raise the same CheckpointError when
    it failed (a full disk must not leave the other ranks waiting in a collective)."""
    error = [None]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            work()
        except OSError as err:
            error[0] = f"saving a checkpoint failed: {err}"
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0]:
        raise CheckpointError(error[0])


def read_loop_state(path: Path) -> dict:
    """The TrainState fields saved in checkpoint `path`."""
    try:
        return json.loads((Path(path) / "loop.json").read_text())["state"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a complete checkpoint ({err})") from err


def _load_tensors(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # not a torch.save archive at all
            raise CheckpointError(f"{path} is not a file written by torch.save ({err})") from err
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values; refusing to load it (it could run code). "
            "Use a checkpoint written by neighborretr-train"
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {err})") from err


def load_weights_into(module: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """`module.load_state_dict(weights)` with a mismatch reported in one line (which keys, which shapes)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [k for k in own if k in weights and own[k].shape != weights[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            k = shapes[0]
            parts.append(
                f"{len(shapes)} tensor(s) of another shape (e.g. {k}: {list(weights[k].shape)} here "
                f"{list(own[k].shape)} in the model)"
            )
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(
            f"{source} was written by another model: {'; '.join(parts)}. Use the model settings of the run that "
            "wrote it"
        )
    module.load_state_dict(weights)


def load_checkpoint(accelerator: Accelerator, path: Path, step: nn.Module, optimizer, scheduler, state) -> None:
    """Restores every part saved by `save_checkpoint` into the prepared objects, on every process."""
    path = Path(path)
    if not is_complete(path):
        missing = [n for n in REQUIRED if not (path / n).is_file()]
        raise CheckpointError(f"{path} is not a complete checkpoint (missing {', '.join(missing)})")
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path / 'model.safetensors'} cannot be read: {err}") from err
    unwrapped = accelerator.unwrap_model(step)
    load_weights_into(unwrapped, weights, path / "model.safetensors")
    training = _load_tensors(path / "training_state.pt")
    optimizer.load_state_dict(training["optimizer"])
    scheduler.load_state_dict(training["scheduler"])
    if accelerator.scaler is not None and training.get("scaler") is not None:
        accelerator.scaler.load_state_dict(training["scaler"])
    unwrapped.objective.load_state_dict(training["objective"])
    unwrapped.objective.to(accelerator.device)
    state.load_state_dict(read_loop_state(path))
    rng = path / f"rng_{accelerator.process_index}.json"
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()), accelerator.device)
    else:
        log.warning("%s: no random state for process %d (saved with fewer processes)", path, accelerator.process_index)
