"""Encoding an evaluation split and scoring it: features are gathered across ranks, then scored in chunks."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.no_grad()
def _encode(
    accelerator: Accelerator, loader: DataLoader, encode, index_key: str, keys: tuple[str, ...], desc: str
) -> dict[str, torch.Tensor]:
    """Runs `encode(batch)` over a prepared loader and returns the gathered outputs sorted by `index_key`."""
    parts: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False):
        out = encode(batch)
        out[index_key] = batch[index_key]
        out = accelerator.gather_for_metrics(out)  # drops the duplicates that pad the last batch
        for key in (*keys, index_key):
            parts.setdefault(key, []).append(out[key].cpu())
    merged = {k: torch.cat(v) for k, v in parts.items()}
    order = merged[index_key].argsort()  # undo the sharding order
    return {k: v[order] for k, v in merged.items()}


@torch.no_grad()
def encode_split(
    accelerator: Accelerator, model: nn.Module, text_loader: DataLoader, video_loader: DataLoader
) -> dict[str, torch.Tensor]:
    """Encodes every caption once and every distinct video once.

    Returns:
        {"text" [Nt, L, D], "text_mask" [Nt, L], "caption_to_video" [Nt], "video" [Nv, T, D], "video_mask" [Nv, T]},
        rows in caption order and video-index order.
    """
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    with accelerator.autocast():
        texts = _encode(
            accelerator,
            text_loader,
            lambda b: {
                "text": model.encode_text(b["text_ids"], b["text_mask"]),
                "text_mask": b["text_mask"],
                "video_index": b["video_index"],
            },
            "caption_index",
            ("text", "text_mask", "video_index"),
            "encoding captions",
        )
        videos = _encode(
            accelerator,
            video_loader,
            lambda b: {"video": model.encode_video(b["video"], b["video_mask"]), "video_mask": b["video_mask"]},
            "video_index",
            ("video", "video_mask"),
            "encoding videos",
        )
    model.train(was_training)
    if not torch.equal(videos["video_index"], torch.arange(len(videos["video_index"]))):
        raise RuntimeError("video features are not one per video index; the video loader must list each video once")
    return {
        "text": texts["text"],
        "text_mask": texts["text_mask"],
        "caption_to_video": texts["video_index"],
        "video": videos["video"],
        "video_mask": videos["video_mask"],
    }


@torch.no_grad()
def score_split(
    model: nn.Module, features: dict[str, torch.Tensor], device: torch.device, chunk_size: int = 256
) -> torch.Tensor:
    """Text-video similarity [Nt, Nv] of encoded features, computed in chunks on `device`."""
    to = {k: v.to(device) for k, v in features.items()}
    return model.chunked_similarity(to["text"], to["text_mask"], to["video"], to["video_mask"], chunk_size).cpu()
