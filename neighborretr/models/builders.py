"""Model builders: the `_target_`s of configs/model/*.yaml. Each returns a ready RetrievalModel; the arguments
after `max_frames` are RetrievalModel's own (see its docstring), so every one can be set from a config."""

from __future__ import annotations

from neighborretr.models.backbone import build_open_clip, build_tiny_clip
from neighborretr.models.retrieval_model import RetrievalModel


def tiny(
    embed_dim: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    context_length: int = 32,
    temporal_layers: int = 2,
    max_frames: int = 32,
    init_temporal_from_text: bool = True,
    freeze_patch_embed: bool = True,
    high_level: bool = False,
    text_ratios: tuple[float, ...] = (1 / 6, 1 / 4),
    video_ratios: tuple[float, ...] = (1 / 4, 1 / 3),
    cluster_k: int = 3,
    global_pool: str = "weighted",
    normalize_global: bool = False,
    temporal_ln_eps: float = 1e-5,
) -> RetrievalModel:
    """A small random model for CPU runs: both towers `width` wide and `layers` deep. `high_level` builds
    NeighborRetr's token-merging global level (needed by the NeighborRetr loss). The tiny towers are random, so
    `init_temporal_from_text` copies random text-tower weights (harmless)."""
    clip = build_tiny_clip(
        embed_dim=embed_dim,
        image_size=image_size,
        patch_size=patch_size,
        vision_width=width,
        vision_layers=layers,
        text_width=width,
        text_layers=layers,
        heads=heads,
        context_length=context_length,
        quick_gelu=False,
    )
    return RetrievalModel(
        clip,
        temporal_layers=temporal_layers,
        max_frames=max_frames,
        quick_gelu=False,
        init_temporal_from_text=init_temporal_from_text,
        freeze_patch_embed=freeze_patch_embed,
        high_level=high_level,
        text_ratios=tuple(text_ratios),
        video_ratios=tuple(video_ratios),
        cluster_k=cluster_k,
        global_pool=global_pool,
        normalize_global=normalize_global,
        temporal_ln_eps=temporal_ln_eps,
    )


def open_clip_model(
    name: str = "ViT-B-32",
    pretrained: str | None = None,
    quick_gelu: bool = True,
    temporal_layers: int = 4,
    max_frames: int = 77,
    init_temporal_from_text: bool = True,
    freeze_patch_embed: bool = True,
    high_level: bool = False,
    text_ratios: tuple[float, ...] = (1 / 6, 1 / 4),
    video_ratios: tuple[float, ...] = (1 / 4, 1 / 3),
    cluster_k: int = 3,
    global_pool: str = "weighted",
    normalize_global: bool = False,
    temporal_ln_eps: float = 1e-5,
) -> RetrievalModel:
    """Any open_clip CLIP architecture (ViT-B-32, ViT-B-16, ViT-L-14, ...), random or pretrained.

    Args:
        pretrained: local checkpoint path (e.g. OpenAI's ViT-B-32.pt), an open_clip tag, or None (random).
        quick_gelu: True for OpenAI weights, which were trained with QuickGELU.
    """
    clip = build_open_clip(name, pretrained=pretrained, quick_gelu=quick_gelu)
    return RetrievalModel(
        clip,
        temporal_layers=temporal_layers,
        max_frames=max_frames,
        quick_gelu=quick_gelu,
        init_temporal_from_text=init_temporal_from_text,
        freeze_patch_embed=freeze_patch_embed,
        high_level=high_level,
        text_ratios=tuple(text_ratios),
        video_ratios=tuple(video_ratios),
        cluster_k=cluster_k,
        global_pool=global_pool,
        normalize_global=normalize_global,
        temporal_ln_eps=temporal_ln_eps,
    )
