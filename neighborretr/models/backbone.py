"""open_clip backbone: building CLIP models and reading token-level features out of them.

Only the standard `open_clip.CLIP` layout (separate text modules on the model, a `VisionTransformer` in
`visual`) is supported: it covers the OpenAI ViT-B/32, ViT-B/16 and ViT-L/14 checkpoints the method uses.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch
from torch import nn


def _is_local_file(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


def load_clip_weights(clip: open_clip.CLIP, path: str | Path) -> None:
    """Loads a local checkpoint into `clip`; every parameter must be present.

    Accepts OpenAI's TorchScript archive (ViT-B-32.pt) or a plain state dict (optionally under "state_dict",
    optionally with DDP's "module." prefix).
    """
    path = Path(path)
    try:  # OpenAI ships whole TorchScript models; only their weights are wanted
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # OpenAI's archives carry metadata entries, and scripted models keep non-persistent buffers (attn_mask)
    ignorable = {"input_resolution", "context_length", "vocab_size"} | {n for n, _ in clip.named_buffers()}
    missing, unexpected = clip.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if k not in ignorable]
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match the {type(clip).__name__} architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Check model.name against the checkpoint (e.g. ViT-B-32 for ViT-B-32.pt)."
        )


def build_open_clip(name: str, pretrained: str | None = None, quick_gelu: bool = True) -> open_clip.CLIP:
    """Builds a named open_clip model, optionally with weights.

    Args:
        name: an open_clip architecture name such as "ViT-B-32".
        pretrained: a local checkpoint file (OpenAI's TorchScript `ViT-B-32.pt` or an open_clip state dict),
            an open_clip tag such as "openai" (downloads, so it needs a network), or None for random weights.
        quick_gelu: OpenAI's weights were trained with QuickGELU; loading them into GELU blocks silently
            degrades every feature, so keep this True for OpenAI checkpoints.
    """
    local = bool(pretrained) and _is_local_file(pretrained)
    if local and not Path(pretrained).is_file():
        raise FileNotFoundError(
            f"model.pretrained={pretrained!r} does not exist. Download OpenAI's checkpoint (e.g. ViT-B-32.pt) "
            "and pass its path, use an open_clip tag such as 'openai' where a network is available, "
            "or set model.pretrained=null for random weights."
        )
    tag = None if local else (pretrained or None)
    model = open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu)
    if not isinstance(model, open_clip.CLIP):
        raise TypeError(f"{name} builds a {type(model).__name__}; only open_clip.CLIP layouts are supported")
    if local:
        load_clip_weights(model, pretrained)
    return model


def build_tiny_clip(
    embed_dim: int = 128,
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 128,
    vision_layers: int = 2,
    text_width: int = 128,
    text_layers: int = 2,
    heads: int = 4,
    context_length: int = 32,
    quick_gelu: bool = False,
) -> open_clip.CLIP:
    """A small random CLIP for CPU runs and tests (same module layout as the real ones)."""
    vision_cfg = open_clip.CLIPVisionCfg(
        layers=vision_layers,
        width=vision_width,
        head_width=vision_width // heads,
        patch_size=patch_size,
        image_size=image_size,
    )
    text_cfg = open_clip.CLIPTextCfg(context_length=context_length, width=text_width, heads=heads, layers=text_layers)
    return open_clip.CLIP(embed_dim=embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, quick_gelu=quick_gelu)


def text_token_features(clip: open_clip.CLIP, ids: torch.Tensor) -> torch.Tensor:
    """Projected hidden states of every text position.

    Args:
        ids: [B, L] token ids (SOS ... EOS, zero padding), L <= the model's context length.

    Returns:
        [B, L, D] features after `ln_final` and `text_projection`. Only the causal mask is applied: the padding
        sits after EOS, so no valid position can attend to it, and padded rows are discarded later by the mask.
    """
    length = ids.shape[1]
    if length > clip.context_length:
        raise ValueError(f"{length} text tokens exceed the model's context length {clip.context_length}")
    cast_dtype = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(ids).to(cast_dtype) + clip.positional_embedding[:length].to(cast_dtype)
    causal = torch.full((length, length), float("-inf"), device=ids.device).triu_(1).to(cast_dtype)
    x = clip.ln_final(clip.transformer(x, attn_mask=causal))
    proj = clip.text_projection
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def frame_features(clip: open_clip.CLIP, frames: torch.Tensor) -> torch.Tensor:
    """Per-frame CLIP image embeddings (the projected CLS token).

    Args:
        frames: [N, 3, H, W] normalised images.

    Returns:
        [N, D] unnormalised embeddings.
    """
    return clip.encode_image(frames, normalize=False)


def embed_dim(clip: open_clip.CLIP) -> int:
    """Width D of the joint embedding space."""
    return int(clip.visual.output_dim)


def text_tower_shape(clip: open_clip.CLIP) -> tuple[int, int]:
    """(width, heads) of the text transformer, read from its first block."""
    attn = clip.transformer.resblocks[0].attn
    return int(attn.embed_dim), int(attn.num_heads)
