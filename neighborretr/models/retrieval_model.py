"""The composed retrieval model: CLIP towers, temporal transformer and token-wise similarity head."""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from neighborretr.models.backbone import embed_dim, frame_features, text_token_features, text_tower_shape
from neighborretr.models.similarity import TokenSimilarity, score_tokens, weighted_token_similarity
from neighborretr.models.temporal import TemporalTransformer
from neighborretr.models.token_merging import TokenHierarchy


class RetrievalModel(nn.Module):
    """Text-video retrieval model (the low level of NeighborRetr, spec §1.2-1.5).

    Holds no loss, optimiser, memory bank or rank logic. `clip` is kept as a direct attribute so parameter names
    start with "clip." (the optimiser's backbone group). `temporal_ln_eps` is the temporal transformer's LayerNorm
    epsilon (CLIP's 1e-5; the official code's 1e-12 for parity, spec §9.21).
    """

    def __init__(
        self,
        clip: open_clip.CLIP,
        temporal_layers: int = 4,
        max_frames: int = 77,
        quick_gelu: bool = True,
        init_temporal_from_text: bool = True,
        freeze_patch_embed: bool = True,
        high_level: bool = False,
        text_ratios: tuple[float, ...] = (1 / 6, 1 / 4),
        video_ratios: tuple[float, ...] = (1 / 4, 1 / 3),
        cluster_k: int = 3,
        global_pool: str = "weighted",
        normalize_global: bool = False,
        temporal_ln_eps: float = 1e-5,
    ):
        super().__init__()
        self.clip = clip
        dim = embed_dim(clip)
        text_width, text_heads = text_tower_shape(clip)
        heads = text_heads if text_width == dim else max(1, dim // 64)
        self.temporal = TemporalTransformer(
            dim, temporal_layers, heads, max_frames, quick_gelu=quick_gelu, ln_eps=temporal_ln_eps
        )
        self.temporal_initialised_from_text = init_temporal_from_text and self.temporal.init_from_text_tower(clip)
        self.sim_head = TokenSimilarity(dim)
        self.high_level = high_level
        self.normalize_global = normalize_global
        if high_level:  # NeighborRetr's global level (spec §1.6); the baseline model does not build it
            self.text_hierarchy = TokenHierarchy(dim, None, text_ratios, cluster_k, global_pool)
            self.video_hierarchy = TokenHierarchy(dim, None, video_ratios, cluster_k, global_pool)
            self.global_head = TokenSimilarity(dim)
        if freeze_patch_embed:  # the official code freezes the patch embedding (visual.conv1)
            clip.visual.conv1.weight.requires_grad_(False)

    @property
    def embed_dim(self) -> int:
        return embed_dim(self.clip)

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    @property
    def context_length(self) -> int:
        return int(self.clip.context_length)

    @property
    def logit_scale(self) -> torch.Tensor:
        """Learnable log of CLIP's inverse temperature (a 0-d parameter)."""
        return self.clip.logit_scale

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids [B, L], mask [B, L] -> token features [B, L, D] in fp32 (padded positions are meaningless)."""
        return text_token_features(self.clip, ids).float()

    def encode_video(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """video [B, T, 3, H, W], mask [B, T] -> frame features after temporal aggregation [B, T, D], fp32."""
        b, t = video.shape[:2]
        frames = frame_features(self.clip, video.flatten(0, 1)).float().view(b, t, -1)
        return self.temporal(frames, mask).float()

    def similarity(
        self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor
    ) -> torch.Tensor:
        """Token-weighted similarity [Bt, Bv] of text features [Bt, L, D] with video features [Bv, N, D]."""
        return self.sim_head(text, text_mask, video, video_mask)

    def similarity_with_bank(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        bank: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The batch's similarity and its scores against a memory bank, each side prepared once.

        Same values as three `similarity` calls, but the batch's tokens are normalised, masked and weighted once
        instead of twice each (their gradients add up in one tensor).

        Args:
            text: [B, L, D], text_mask [B, L], video [B, T, D], video_mask [B, T]: the batch.
            bank: {"text" [M, L', D], "text_mask" [M, L'], "video" [M, T', D], "video_mask" [M, T']}.

        Returns:
            sim [B, B] (texts x videos), bank_text_to_video [M, B], text_to_bank_video [B, M].
        """
        head = self.sim_head
        texts, videos = head.prepare_text(text, text_mask), head.prepare_video(video, video_mask)
        bank_texts = head.prepare_text(bank["text"], bank["text_mask"])
        bank_videos = head.prepare_video(bank["video"], bank["video_mask"])
        return score_tokens(texts, videos), score_tokens(bank_texts, videos), score_tokens(texts, bank_videos)

    def chunked_similarity(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        chunk_size: int = 256,
    ) -> torch.Tensor:
        """The same scores computed block by block without gradient (evaluation)."""
        return self.sim_head.chunked(text, text_mask, video, video_mask, chunk_size)

    def global_tokens(
        self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged global tokens of the high level: text [B, Kt, D] and video [B, Kv, D] (Kt = Kv = 1 for 24 words
        and 12 frames with the official ratios)."""
        if not self.high_level:
            raise RuntimeError("this model was built without the high level (model.high_level=false)")
        return self.text_hierarchy(text, text_mask.detach()), self.video_hierarchy(video, video_mask.detach())

    def global_similarity(self, text_global: torch.Tensor, video_global: torch.Tensor) -> torch.Tensor:
        """High-level similarity [Bt, Bv] of merged tokens: the weighted token-wise formula with the high-level
        weight MLPs, without L2 normalisation and without masks, as the official `global_level` (spec §1.6)."""
        wt = self.global_head.text_weights(text_global, torch.ones(text_global.shape[:2], device=text_global.device))
        wv = self.global_head.video_weights(
            video_global, torch.ones(video_global.shape[:2], device=video_global.device)
        )
        ones_t = torch.ones(text_global.shape[:2], device=text_global.device)
        ones_v = torch.ones(video_global.shape[:2], device=video_global.device)
        if self.normalize_global:  # clean option (spec §9 item 4): cosine scale like the low level
            text_global, video_global = F.normalize(text_global, dim=-1), F.normalize(video_global, dim=-1)
        return weighted_token_similarity(text_global, ones_t, wt, video_global, ones_v, wv)

    def global_vectors(
        self, text_global: torch.Tensor, video_global: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One vector per sample ([B, D] each) for the centrality weights; K > 1 tokens are pooled with the
        high-level weight MLPs' softmax (our fix for the official crash beyond 24 words / 12 frames)."""
        return (
            self.text_hierarchy.reduce_to_one(text_global, self.global_head.text_weights.net),
            self.video_hierarchy.reduce_to_one(video_global, self.global_head.video_weights.net),
        )

    def forward(
        self, text_ids: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor, video_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Encodes a batch of pairs: returns {"text", "text_mask", "video", "video_mask"} features."""
        return {
            "text": self.encode_text(text_ids, text_mask),
            "text_mask": text_mask,
            "video": self.encode_video(video, video_mask),
            "video_mask": video_mask,
        }

    def compile_encoders(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Compiles the two CLIP towers and the temporal transformer in place with `torch.compile`.

        In place (`nn.Module.compile`), so parameter names, state dicts and checkpoints do not change. The heads
        stay eager: their clustering (top-k, scatter, data-dependent centres) is small and would mostly break the
        graph, while the towers are static-shape transformers that hold nearly all of a step's FLOPs.

        Args:
            backend: a `torch.compile` backend ("inductor" generates kernels; "aot_eager" traces only).
            mode: a `torch.compile` mode ("max-autotune", "reduce-overhead", ...) or None.
        """
        for module in (self.clip.visual, self.clip.transformer, self.temporal):
            module.compile(backend=backend, mode=mode)

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = 100.0) -> None:
        """Keeps exp(logit_scale) <= max_scale, as CLIP and the official trainer do after every step."""
        self.clip.logit_scale.clamp_(max=math.log(max_scale))
