"""A fixed-capacity FIFO of recent (gathered) batch features, the memory bank of L_Nbi (spec §3)."""

from __future__ import annotations

import torch
from torch import nn


class MemoryBank(nn.Module):
    """Ring buffer of text tokens, video tokens, their masks and sample ids, read back newest first.

    The official code pushes each gathered batch to the front and truncates to the capacity
    (`cat([batch, bank])[:C]`); this class gives the same `get()` without reallocating, by writing into a ring
    with `index_copy_`. Row 0 of a batch counts as the newest item, so `get()` lists the latest batch in its own
    row order, then the batch before it, and so on. Everything is a registered buffer, so `state_dict()`,
    `load_state_dict()` and `.to()` carry the contents (`.to(dtype)` casts only the feature buffers).

    Unlike the official code, whose capacity is implied by mb_batch × per-GPU batch (`--memory_size` is unused,
    spec §9 item 2), the capacity here is explicit.

    The item shapes may be left out: the buffers are then allocated by the first `enqueue` (shapes, dtypes and
    device of that batch) or by `load_state_dict` (those of the saved bank), so the objective that owns the bank
    can be built before the model and the data settings are known.

    Buffers:
        text [C, L, D], text_mask [C, L], video [C, T, D], video_mask [C, T], ids [C] (long),
        size 0-d long (number of filled rows), ptr 0-d long (next ring slot to write).

    Args:
        capacity: C, the most items kept.
        text_shape: (L, D) of one text item's token features, or None to take it from the first batch.
        video_shape: (T, D) of one video item's frame features, or None (both or neither).
        dtype: dtype of the feature buffers.
        mask_dtype: dtype of the mask buffers.
    """

    _KEYS = ("text", "text_mask", "video", "video_mask", "ids")

    def __init__(
        self,
        capacity: int,
        text_shape: tuple[int, int] | None = None,
        video_shape: tuple[int, int] | None = None,
        dtype: torch.dtype = torch.float32,
        mask_dtype: torch.dtype = torch.long,
    ) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if (text_shape is None) != (video_shape is None):
            raise ValueError("give both text_shape and video_shape, or neither")
        self.capacity = capacity
        self.register_buffer("ids", torch.zeros(capacity, dtype=torch.long))
        self.register_buffer("size", torch.zeros((), dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        for key in ("text", "text_mask", "video", "video_mask"):
            self.register_buffer(key, None)
        if text_shape is not None:
            if len(text_shape) != 2 or len(video_shape) != 2:
                raise ValueError(
                    f"text_shape and video_shape must be (L, D) and (T, D), got {text_shape}, {video_shape}"
                )
            (length, dim_t), (frames, dim_v) = text_shape, video_shape
            self._allocate(
                {
                    "text": torch.empty(0, length, dim_t, dtype=dtype),
                    "text_mask": torch.empty(0, length, dtype=mask_dtype),
                    "video": torch.empty(0, frames, dim_v, dtype=dtype),
                    "video_mask": torch.empty(0, frames, dtype=mask_dtype),
                }
            )

    @property
    def allocated(self) -> bool:
        return self.text is not None

    def _allocate(self, like: dict[str, torch.Tensor]) -> None:
        """Zero buffers of `capacity` rows with the item shape, dtype and device of each example tensor."""
        for key, value in like.items():
            setattr(self, key, value.new_zeros((self.capacity, *value.shape[1:])))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A lazily built bank takes its shapes from the saved one before the usual copy.
        saved = {
            k: state_dict[prefix + k] for k in ("text", "text_mask", "video", "video_mask") if prefix + k in state_dict
        }
        if len(saved) == 4 and not self.allocated:
            self._allocate({k: v[:0].to(self.ids.device) for k, v in saved.items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _check(self, items: dict[str, torch.Tensor]) -> int:
        rows = {key: value.shape[0] if value.ndim else -1 for key, value in items.items()}
        if len(set(rows.values())) != 1:
            raise ValueError(f"all inputs must have the same number of rows, got {rows}")
        for key, value in items.items():
            expected = getattr(self, key).shape[1:]
            if value.shape[1:] != expected:
                shape = ", ".join(map(str, expected))
                raise ValueError(f"{key} must have shape [n, {shape}], got {tuple(value.shape)}")
        return next(iter(rows.values()))

    @torch.no_grad()
    def enqueue(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        video: torch.Tensor,
        video_mask: torch.Tensor,
        ids: torch.Tensor,
    ) -> None:
        """Adds a batch in front of the bank; the oldest items drop off once it is full.

        Args:
            text: [n, L, D] text token features.
            text_mask: [n, L] text masks.
            video: [n, T, D] video features.
            video_mask: [n, T] video masks.
            ids: [n] sample ids.

        A batch with n > C keeps only its first (newest) C rows, as `cat([batch, bank])[:C]` would.
        """
        items = {"text": text, "text_mask": text_mask, "video": video, "video_mask": video_mask, "ids": ids}
        if not self.allocated:
            self._allocate({k: v.detach().to(self.ids.device) for k, v in items.items() if k != "ids"})
        count = self._check(items)
        if count == 0:
            return
        count = min(count, self.capacity)
        # Row 0 must end up the newest, i.e. written last, so the kept rows go into the ring in reverse order.
        slots = (self.ptr + torch.arange(count, device=self.ptr.device)) % self.capacity
        for key, value in items.items():
            buffer = getattr(self, key)
            source = value[:count].flip(0).detach().to(device=buffer.device, dtype=buffer.dtype)
            buffer.index_copy_(0, slots.to(buffer.device), source)
        self.ptr.copy_((self.ptr + count) % self.capacity)
        self.size.copy_((self.size + count).clamp_max(self.capacity))

    def get(self) -> dict[str, torch.Tensor]:
        """The filled part, newest first.

        Returns:
            {"text" [S, L, D], "text_mask" [S, L], "video" [S, T, D], "video_mask" [S, T], "ids" [S]} with
            S = len(self); copies, so later enqueues do not change them.
        """
        size = len(self)
        if not self.allocated:
            return {key: self.ids[:0] for key in self._KEYS}  # nothing has been stored yet
        # The newest item sits just before the write pointer; walk the ring backwards from there.
        order = (self.ptr - 1 - torch.arange(size, device=self.ptr.device)) % self.capacity
        return {key: getattr(self, key).index_select(0, order.to(getattr(self, key).device)) for key in self._KEYS}

    @torch.no_grad()
    def reset(self) -> None:
        """Empties the bank (the official code clears it at the end of every epoch)."""
        for key in self._KEYS:
            if getattr(self, key) is not None:
                getattr(self, key).zero_()
        self.size.zero_()
        self.ptr.zero_()

    def __len__(self) -> int:
        return int(self.size.item())

    def __bool__(self) -> bool:
        # Without this, `if bank:` would fall back to __len__ and treat an empty (but existing) bank as missing.
        return True

    def extra_repr(self) -> str:
        if not self.allocated:
            return f"capacity={self.capacity}, shapes from the first batch"
        return f"capacity={self.capacity}, text={tuple(self.text.shape[1:])}, video={tuple(self.video.shape[1:])}"
