"""Shared pieces of the search tests: a tiny random model, a fake run folder and the evaluation-path reference."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from neighborretr.data.annotations import parse_msrvtt
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.eval.hubness_eval import intra_similarity, pooled_tokens
from neighborretr.models.builders import tiny
from neighborretr.search import Sampling
from neighborretr_train import config_dir
from neighborretr_train.common import build
from tests.conftest import TINY_OVERRIDES

SAMPLING = Sampling(max_frames=4, image_size=32, max_words=16)


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The tests' tiny random model at 32 px, in eval mode (the settings of TINY_OVERRIDES' model)."""
    torch.manual_seed(seed)
    return tiny(image_size=32, width=64, embed_dim=64).eval()


def copy_test_videos(synthetic: Path, folder: Path) -> list[str]:
    """Copies the test split's videos into `folder` (a gallery disjoint from the training banks); their ids."""
    ids = sorted({r.video_id for r in parse_msrvtt(synthetic, "test")})
    folder.mkdir(parents=True, exist_ok=True)
    for video_id in ids:
        shutil.copy(synthetic / "videos" / f"{video_id}.mp4", folder / f"{video_id}.mp4")
    return ids


@torch.no_grad()
def eval_features(model, synthetic: Path, split: str, video_ids: list[str] | None = None, records=None) -> dict:
    """Features of a split (or of `records`) as the evaluation encodes them (`VideoTextDataset`, uniform sampling)."""
    records = records if records is not None else parse_msrvtt(synthetic, split)
    texts = VideoTextDataset(records, synthetic / "videos", 16, 4, 32, load_video=False)
    first = list({r.video_id: r for r in reversed(records)}.values())
    if video_ids is not None:
        first = sorted([r for r in first if r.video_id in video_ids], key=lambda r: r.video_id)
    videos = VideoTextDataset(first, synthetic / "videos", 16, 4, 32, load_text=False)
    tb = torch.utils.data.default_collate([texts[i] for i in range(len(texts))])
    vb = torch.utils.data.default_collate([videos[i] for i in range(len(videos))])
    return {
        "captions": [r.caption for r in records],
        "caption_video": [r.video_id for r in records],
        "video_ids": videos.video_ids,
        "text": model.encode_text(tb["text_ids"], tb["text_mask"]),
        "text_mask": tb["text_mask"],
        "video": model.encode_video(vb["video"], vb["video_mask"]),
        "video_mask": vb["video_mask"],
    }


@torch.no_grad()
def eval_matrices(model, test: dict, bank: dict) -> dict:
    """t2v matrices exactly as `hubness_eval.split_matrices` builds them (sim, query bank, gallery bank)."""
    sim = model.chunked_similarity(test["text"], test["text_mask"], test["video"], test["video_mask"])
    query_bank = model.chunked_similarity(bank["text"], bank["text_mask"], test["video"], test["video_mask"])
    head = model.sim_head.video_weights
    gallery_bank = intra_similarity(
        pooled_tokens(bank["video"], bank["video_mask"], head), pooled_tokens(test["video"], test["video_mask"], head)
    )
    return {"sim": sim, "query_bank": query_bank, "gallery_bank": gallery_bank}


def fake_run(synthetic: Path, run_dir: Path, seed: int = 0) -> Path:
    """A run folder as neighborretr-train leaves it (config.yaml, best/model.pt), with random tiny weights."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", [*TINY_OVERRIDES, f"data.root={synthetic}", f"output_dir={run_dir}"])
    run_dir.mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    (run_dir / "best").mkdir()
    torch.manual_seed(seed)
    torch.save(build(cfg, "model").state_dict(), run_dir / "best" / "model.pt")
    return run_dir
