"""Evaluate a trained model on a split: python scripts/evaluate.py ckpt=outputs/synthetic_tiny/<timestamp>

`ckpt` is a run folder (its selected model, best/model.pt, is used), a .pt state-dict file inside a run folder, or
a checkpoints/step_* folder. Model and data settings come from the run's config.yaml; `data.*` keys given here
override them. Prints a table of R@1/5/10, MdR and MnR for both directions and writes it as JSON.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from _setup import build_model, check_videos, eval_loaders, make_accelerator, records, shared_run_dir, user_errors
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file

from neighborretr.engine import write_json
from neighborretr.eval.features import evaluate_split
from neighborretr.eval.metrics import format_table


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
    split_records = check_videos(run_cfg, {cfg.split: records(run_cfg, cfg.split)}, accelerator)[cfg.split]
    model = build_model(run_cfg)
    model.load_state_dict(load_weights(weights))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    loaders = accelerator.prepare(*eval_loaders(run_cfg, split_records))
    metrics = evaluate_split(accelerator, model, *loaders, chunk_size=cfg.eval.chunk_size)
    if accelerator.is_main_process:
        payload = {"split": cfg.split, "weights": str(weights), "captions": len(split_records), **metrics}
        write_json(out_dir / f"eval_{cfg.split}.json", payload)
        print(format_table(metrics, title=f"{cfg.split} ({len(split_records)} captions) from {weights}"))
        print(f"results: {out_dir / f'eval_{cfg.split}.json'}")
    return metrics


if __name__ == "__main__":
    main()
