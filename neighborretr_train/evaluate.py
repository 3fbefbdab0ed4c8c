"""The evaluation recipe: `evaluate(cfg) -> rows` for a trained run's selected model (or any checkpoint).

    neighborretr-eval ckpt=outputs/synthetic_tiny/<timestamp>
    accelerate launch -m neighborretr_train.evaluate ckpt=/runs/msrvtt/best/model.pt data.root=/data/msrvtt

`ckpt` is a run folder (its best/model.pt is used), a .pt state-dict file inside a run folder, or a
checkpoints/step_* folder. Model and data settings come from the run's saved config (its unresolved form, so a
moved `data.root` also moves every path derived from it); `data.*` keys given here override them.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from neighborretr.checkpoint import CheckpointError, load_weights_into
from neighborretr.eval.pipeline import gallery_ids, write_report
from neighborretr_train.common import (
    ConfigError,
    Evaluator,
    build,
    check_model_data,
    create_run_dir,
    hydra_entry,
    log,
    save_config,
    setup_accelerator,
    setup_records,
)
from neighborretr_train.schema import check_config


def locate(ckpt: Path) -> tuple[Path, Path]:
    """(run folder, weights file) for any of the accepted `ckpt` forms."""
    if ckpt.is_file():
        run_dir = ckpt.parent.parent if ckpt.parent.name in ("best", "checkpoints") else ckpt.parent
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"ckpt={ckpt}: no run folder around it ({run_dir} has no config.yaml, which says what model it is); "
                "pass a run folder, its best/model.pt or a checkpoints/step_* folder"
            )
        return run_dir, ckpt
    if (ckpt / "config.yaml").is_file():
        return ckpt, ckpt / "best" / "model.pt"
    if ckpt.name.startswith("step_") and (ckpt / "model.safetensors").is_file():
        return ckpt.parent.parent, ckpt / "model.safetensors"
    raise FileNotFoundError(
        f"ckpt={ckpt}: expected a run folder (with config.yaml), a best/model.pt file or a checkpoints/step_* folder"
    )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors, read without unpickling objects (a file that holds any is refused)."""
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    try:
        if path.suffix == ".safetensors":  # a training checkpoint: the TrainStep's weights, "model." prefixed
            weights = load_file(str(path))
            return {k.removeprefix("model."): v for k, v in weights.items()}
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not zipfile.is_zipfile(path):  # not a torch.save archive at all
            raise CheckpointError(
                f"{path} is not a weights file; pass a run folder, its best/model.pt or a checkpoints/step_* folder"
            ) from err
        raise CheckpointError(
            f"{path} holds objects other than tensors; refusing to load it (it could run code)"
        ) from err
    except Exception as err:  # noqa: BLE001  (any reader error means: not a weights file)
        raise CheckpointError(
            f"{path} is not a weights file ({type(err).__name__}); pass a run folder, its best/model.pt or a "
            "checkpoints/step_* folder"
        ) from err
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors; pass a model.pt written by training")
    return weights


def saved_run_config(run_dir: Path) -> DictConfig:
    """The config a run saved (its unresolved form when present, so a moved `data.root` moves derived paths)."""
    saved = run_dir / "config.unresolved.yaml"
    if not saved.is_file():
        saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise FileNotFoundError(f"{run_dir} has no config.yaml: is it a run folder of neighborretr-train?")
    run_cfg = OmegaConf.load(saved)
    if "_target_" not in run_cfg.get("data", {}):
        raise ConfigError(
            f"{saved} was written by a version before the data settings became a `_target_` (2026-12-01): add "
            "`_target_: neighborretr.data.module.VideoTextData` and `seed: ${seed}` under its `data:` node"
        )
    if "pretrained" in run_cfg.model:  # the checkpoint replaces the backbone weights: do not load them twice
        run_cfg.model.pretrained = None
    return run_cfg


def load_run_model(ckpt: Path) -> tuple[torch.nn.Module, DictConfig, Path]:
    """(model in eval mode with the checkpoint's weights, the run's saved config, the weights file) for any
    accepted `ckpt` form (see `locate`); the model is on the CPU."""
    run_dir, weights = locate(Path(ckpt))
    run_cfg = saved_run_config(run_dir)
    model = build(run_cfg, "model")
    load_weights_into(model, load_weights(weights), weights)
    return model.eval(), run_cfg, weights


def run_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The run's saved config with this call's data overrides, precision and evaluation settings."""
    run_cfg = saved_run_config(run_dir)
    run_cfg.data = OmegaConf.merge(run_cfg.data, {k: v for k, v in cfg.data.items() if v is not None})
    run_cfg.eval = cfg.eval
    run_cfg.trainer.mixed_precision = cfg.trainer.mixed_precision
    run_cfg.trainer.cpu = cfg.trainer.cpu
    return run_cfg


def evaluate(cfg: DictConfig) -> dict:
    """Scores `cfg.split` raw and with every configured normalisation; returns the rows."""
    check_config(cfg, "eval")
    run_dir, weights = locate(Path(cfg.ckpt))
    run_cfg = run_config(cfg, run_dir)
    accelerator = setup_accelerator(run_cfg.trainer)
    data = build(run_cfg, "data")
    if cfg.eval.as_published:
        log.warning("eval.as_published applies to training (per-epoch test scores); one checkpoint has no epochs")
    methods = list(cfg.eval.normalizations)
    splits = [cfg.split]
    if any(m != "none" for m in methods):
        splits = list(dict.fromkeys([cfg.split, "val", "train"]))
        if cfg.split == "val":
            log.warning("split=val: the normalisations' β/τ are chosen and reported on the same split")
    records = setup_records(data, splits, accelerator)
    model = build(run_cfg, "model")
    check_model_data(model, data)
    load_weights_into(model, load_weights(weights), weights)
    model = accelerator.prepare_model(model, evaluation_mode=True)
    evaluator = Evaluator(accelerator, data, cfg.eval, records)
    out_dir = create_run_dir(cfg, accelerator, Path(cfg.output_root) / "eval")
    save_config(cfg, out_dir, "config", accelerator)
    report = evaluator(model, cfg.split, methods, weights=weights)
    ids = gallery_ids(records[cfg.split])
    write_report(accelerator, report, out_dir, cfg.split, cfg.eval.k, hubs=cfg.eval.hub_report, gallery_ids=ids)
    if accelerator.is_main_process:
        print(f"{cfg.split}: {len(records[cfg.split])} captions, weights {weights}; written to {out_dir}")
    return report["rows"]


main = hydra_entry("eval", evaluate)


if __name__ == "__main__":
    main()
