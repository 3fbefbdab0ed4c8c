"""Temporal aggregation of per-frame features (spec §1.3)."""

from __future__ import annotations

import functools

import open_clip
import torch
from open_clip.transformer import LayerNorm, QuickGELU, Transformer
from torch import nn

# Added to attention logits of padded frames; finite so that fp16/bf16 stay NaN-free.
_MASKED = -1e4


class TemporalTransformer(nn.Module):
    """Frame features + frame position embeddings -> pre-LN transformer -> residual to the input.

    Width and heads are arguments (read from the backbone by the builder), never fixed. ``ln_eps`` is the epsilon
    of every LayerNorm in the blocks: 1e-5 is CLIP's (whose text-tower weights initialise them); the official
    code's copy uses the TF-style 1e-12 (spec §9.21), a parity switch.
    """

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        max_frames: int = 77,
        quick_gelu: bool = True,
        ln_eps: float = 1e-5,
    ):
        super().__init__()
        if layers < 1 or max_frames < 1:
            raise ValueError(f"model.temporal_layers={layers} and model.max_frames={max_frames} must be >= 1")
        if not ln_eps > 0:
            raise ValueError(f"model.temporal_ln_eps={ln_eps} must be > 0")
        self.heads = heads
        self.frame_position_embeddings = nn.Embedding(max_frames, width)
        self.transformer = Transformer(
            width,
            layers,
            heads,
            act_layer=QuickGELU if quick_gelu else nn.GELU,
            norm_layer=functools.partial(LayerNorm, eps=ln_eps),
            batch_first=True,
        )
        nn.init.normal_(self.frame_position_embeddings.weight, std=0.02)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Aggregates a clip's frames.

        Args:
            frames: [B, T, D] per-frame features.
            mask: [B, T], 1 for real frames, 0 for padding.

        Returns:
            [B, T, D] contextualised frame features (the un-embedded input is added back, as in the official code).
        """
        num_frames = frames.shape[1]
        if num_frames > self.frame_position_embeddings.num_embeddings:
            raise ValueError(f"{num_frames} frames exceed {self.frame_position_embeddings.num_embeddings} positions")
        positions = self.frame_position_embeddings.weight[:num_frames]
        key_bias = (1.0 - mask.to(frames.dtype)) * _MASKED  # [B, T]: padded keys get a large negative bias
        attn_mask = key_bias[:, None, :].expand(-1, num_frames, -1).repeat_interleave(self.heads, dim=0)
        return self.transformer(frames + positions, attn_mask=attn_mask) + frames

    @torch.no_grad()
    def init_from_text_tower(self, clip: open_clip.CLIP) -> bool:
        """Copies CLIP's text positional embedding and first text layers into this module (spec §1.3).

        Returns:
            True when the shapes matched and the weights were copied; False leaves the random initialisation
            (for backbones whose text width differs from the joint embedding width).
        """
        text_pos = clip.positional_embedding
        own_pos = self.frame_position_embeddings.weight
        blocks = self.transformer.resblocks
        if text_pos.shape[1] != own_pos.shape[1] or len(clip.transformer.resblocks) < len(blocks):
            return False
        if blocks[0].attn.num_heads != clip.transformer.resblocks[0].attn.num_heads:
            return False
        rows = min(text_pos.shape[0], own_pos.shape[0])
        own_pos[:rows].copy_(text_pos[:rows])
        for own, text in zip(blocks, clip.transformer.resblocks):
            own.load_state_dict(text.state_dict())
        return True
