"""Turning video files and captions into what the index stores: unit tokens, masks, head weights, summaries.

Clips are decoded exactly as evaluation decodes them (`read_frames` with the evaluation sampling, then
`clip_frames`, zero-padded to ``max_frames``), so an indexed clip has the features evaluation would give it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from neighborretr.data.module import ignore_stop_signals
from neighborretr.data.transforms import CaptionTokenizer, clip_frames
from neighborretr.data.video_io import VIDEO_EXTENSIONS, VideoDecodeError, read_frames
from neighborretr.search.format import Sampling


@dataclass
class Encoded:
    """Encoded items: unit tokens [N, T, D], mask [N, T] bool, head weights [N, T] (rows sum to 1 over valid
    tokens) and unit summaries pooled [N, D] (the head-weighted mean of the unit tokens, re-normalised)."""

    tokens: Tensor
    mask: Tensor
    weights: Tensor
    pooled: Tensor


def list_videos(root: Path) -> list[str]:
    """Relative posix paths of every video file under `root` (any extension the data pipeline reads), sorted."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in files:
            if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS:
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


def video_duration(path: Path) -> float | None:
    """Duration in seconds from the container header (PyAV), or None when the header does not say."""
    import av

    try:
        with av.open(str(path)) as container:
            if container.duration is not None:
                return container.duration / 1_000_000  # av.time_base
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
    except Exception:  # noqa: BLE001  (a header we cannot read: the decoder has already judged the file)
        return None
    return None


class ClipFiles(Dataset):
    """One item per file: {"video" [T, 3, S, S], "video_mask" [T], "position", "duration"}, or
    {"position", "error"} for a file that cannot be decoded (the caller counts it; it never stops indexing)."""

    def __init__(self, root: Path, paths: list[str], sampling: Sampling):
        self.root, self.paths, self.sampling = Path(root), paths, sampling

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> dict:
        s, path = self.sampling, self.root / self.paths[position]
        try:
            frames, _ = read_frames(path, s.max_frames, mode=s.sampling, backend=s.backend, framerate=s.framerate)
        except VideoDecodeError as err:
            return {"position": position, "error": err.reason}
        clip = clip_frames(frames, s.image_size)
        video = torch.zeros(s.max_frames, *clip.shape[1:])
        video[: len(clip)] = clip
        mask = torch.zeros(s.max_frames, dtype=torch.long)
        mask[: len(clip)] = 1
        return {"position": position, "video": video, "video_mask": mask, "duration": video_duration(path)}


def _collate(items: list[dict]) -> dict:
    good = [i for i in items if "error" not in i]
    out = {"failed": [(i["position"], i["error"]) for i in items if "error" in i]}
    out["positions"] = [i["position"] for i in good]
    out["durations"] = [i["duration"] for i in good]
    if good:
        out["video"] = torch.stack([i["video"] for i in good])
        out["video_mask"] = torch.stack([i["video_mask"] for i in good])
    return out


def summarize(features: Tensor, mask: Tensor, head: nn.Module) -> Encoded:
    """Unit tokens, head weights and summaries of raw features [N, T, D] with mask [N, T].

    `head` is one of the similarity head's `TokenWeights` (video_weights for clips, text_weights for captions);
    the weights are those the token-wise score uses, so a stored item scores as evaluation scores it.
    """
    weights = head(features, mask).float()
    unit = F.normalize(features.float(), dim=-1)
    pooled = F.normalize(torch.einsum("nt,ntd->nd", weights, unit), dim=-1)
    return Encoded(tokens=unit, mask=mask.bool(), weights=weights, pooled=pooled)


def concat(parts: list[Encoded]) -> Encoded:
    return Encoded(*(torch.cat([getattr(p, f) for p in parts]) for f in ("tokens", "mask", "weights", "pooled")))


@torch.no_grad()
def encode_video_files(
    model: nn.Module,
    root: Path,
    paths: list[str],
    sampling: Sampling,
    device: torch.device,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
) -> Iterator[tuple[list[int], list[float | None], Encoded | None, list[tuple[int, str]]]]:
    """Decodes (`num_workers` processes) and encodes `paths` under `root` batch by batch.

    Yields:
        (positions in `paths` of the encoded clips, their durations, their `Encoded` on CPU or None when the whole
        batch failed, [(position, reason)] of the files that could not be decoded).
    """
    loader = DataLoader(
        ClipFiles(root, paths, sampling),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=ignore_stop_signals,
    )
    model.eval()
    for batch in tqdm(loader, desc="indexing videos", unit="batch", disable=not progress):
        encoded = None
        if batch["positions"]:
            mask = batch["video_mask"].to(device)
            features = model.encode_video(batch["video"].to(device), mask)
            encoded = _to_cpu(summarize(features, mask, model.sim_head.video_weights))
        yield batch["positions"], batch["durations"], encoded, batch["failed"]


def _to_cpu(e: Encoded) -> Encoded:
    return Encoded(e.tokens.cpu(), e.mask.cpu(), e.weights.cpu(), e.pooled.cpu())


class TextEncoder:
    """Caption -> (unit tokens [L, D], mask [L], head weights [L], summary [D]) with the model's text tower."""

    def __init__(self, model: nn.Module, max_words: int, device: torch.device):
        self.model, self.device = model, device
        self.tokenizer = CaptionTokenizer(max_words)

    @torch.no_grad()
    def batch(self, captions: list[str]) -> Encoded:
        """Encodes captions [B] -> `Encoded` with tokens [B, L, D] (on CPU)."""
        pairs = [self.tokenizer(c) for c in captions]
        ids = torch.stack([p[0] for p in pairs]).to(self.device)
        mask = torch.stack([p[1] for p in pairs]).to(self.device)
        self.model.eval()
        features = self.model.encode_text(ids, mask)
        return _to_cpu(summarize(features, mask, self.model.sim_head.text_weights))

    def __call__(self, caption: str) -> Encoded:
        """One caption -> `Encoded` with a leading batch dimension of 1."""
        return self.batch([caption])


def encode_captions(encoder: TextEncoder, captions: list[str], batch_size: int = 256, progress: bool = True) -> Encoded:
    """All `captions` in batches (the query bank)."""
    if not captions:
        raise ValueError("the query bank has no captions")
    bar: Callable = tqdm if progress else (lambda x, **_: x)
    starts = range(0, len(captions), batch_size)
    return concat([encoder.batch(captions[s : s + batch_size]) for s in bar(starts, desc="encoding query bank")])
