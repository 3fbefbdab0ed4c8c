"""Evaluate a trained model on a split: python scripts/evaluate.py ckpt=outputs/synthetic_tiny/<timestamp>

`ckpt` is a run folder (its selected model, best/model.pt, is used), a .pt state-dict file inside a run folder, or
a checkpoints/step_* folder. Model and data settings come from the run's config.yaml; `data.*` keys given here
override them. Prints a table of R@1/5/10, MdR and MnR for both directions and writes it as JSON.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from _setup import (
    bank_cache_path,
    bank_loaders,
    bank_records,
    build_model,
    check_videos,
    eval_loaders,
    make_accelerator,
    needs_banks,
    records,
    shared_run_dir,
    user_errors,
)
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from neighborretr.eval.pipeline import evaluate_report, write_report

log = logging.getLogger("neighborretr")


def locate(ckpt: Path) -> tuple[Path, Path]:
    """(run folder, weights file) for any of the accepted `ckpt` forms."""
    if ckpt.is_file():
        run_dir = ckpt.parent.parent if ckpt.parent.name in ("best", "checkpoints") else ckpt.parent
        return run_dir, ckpt
    if (ckpt / "config.yaml").is_file():
        return ckpt, ckpt / "best" / "model.pt"
    if ckpt.name.startswith("step_") and (ckpt / "model.safetensors").is_file():
        return ckpt.parent.parent, ckpt / "model.safetensors"
    raise FileNotFoundError(
        f"ckpt={ckpt}: expected a run folder (with config.yaml), a best/model.pt file or a checkpoints/step_* folder"
    )


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no weights at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
@user_errors
def main(cfg: DictConfig) -> dict:
    run_dir, weights = locate(Path(cfg.ckpt))
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    overrides = {k: v for k, v in cfg.data.items() if v is not None}
    if "root" in overrides and "video_dir" not in overrides:
        overrides["video_dir"] = f"{overrides['root']}/videos"
    run_cfg.data = OmegaConf.merge(run_cfg.data, overrides)
    run_cfg.eval, run_cfg.trainer.mixed_precision = cfg.eval, cfg.trainer.mixed_precision

    if "pretrained" in run_cfg.model:  # the checkpoint replaces the backbone weights: do not load them twice
        run_cfg.model.pretrained = None
    accelerator = make_accelerator(run_cfg, with_tracker=False)
    out_dir = shared_run_dir(accelerator)
    split_records = {cfg.split: records(run_cfg, cfg.split)}
    if needs_banks(run_cfg):
        split_records["val"] = records(run_cfg, "val")
        split_records["bank_captions"], split_records["bank_videos"] = bank_records(run_cfg, records(run_cfg, "train"))
        if cfg.split == "val":
            log.warning("split=val: the normalisations' β/τ are chosen and reported on the same split")
    split_records = check_videos(run_cfg, split_records, accelerator)
    model = build_model(run_cfg)
    model.load_state_dict(load_weights(weights))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    banks = "bank_captions" in split_records
    report = evaluate_report(
        accelerator,
        model,
        accelerator.prepare(*eval_loaders(run_cfg, split_records[cfg.split])),
        list(cfg.eval.normalizations),
        val_loaders=accelerator.prepare(*eval_loaders(run_cfg, split_records["val"])) if banks else None,
        bank_loaders=accelerator.prepare(
            *bank_loaders(run_cfg, (split_records["bank_captions"], split_records["bank_videos"]))
        )
        if banks
        else None,
        bank_cache=bank_cache_path(run_cfg, weights) if banks else None,
        k=cfg.eval.k,
        chunk_size=cfg.eval.chunk_size,
    )
    write_report(accelerator, report, out_dir, cfg.split, cfg.eval.k)
    if accelerator.is_main_process:
        print(f"{cfg.split}: {len(split_records[cfg.split])} captions, weights {weights}")
    return report["rows"]


if __name__ == "__main__":
    main()
