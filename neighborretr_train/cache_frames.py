"""Decode every video of a data config once into a frame cache.

    neighborretr-cache-frames experiment=msrvtt_vitb32 data.root=/data/msrvtt data.frame_cache=/fast/msrvtt_cache

The cache holds the frames training and evaluation would decode with these data settings (see
`neighborretr.data.frame_cache`); a run given the same `data.frame_cache` reads them from it. The estimated size is
printed before any decoding starts; re-running resumes (entries already cached are skipped, failed ones retried).
Exit status 1 when any video failed (each is listed, all of them in DIR/failures.txt), 0 otherwise.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig

from neighborretr.data.frame_cache import CacheSummary, build_frame_cache, estimate_bytes
from neighborretr_train.common import ConfigError, build, hydra_entry
from neighborretr_train.schema import check_config

log = logging.getLogger("neighborretr")
SHOWN = 20  # failures printed on the console; failures.txt has all of them


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def report(summary: CacheSummary, folder: Path) -> str:
    """The counts and size, then one `key: reason` line per failure (at most SHOWN)."""
    lines = [
        f"cached: {len(summary.cached)}  skipped (already cached): {len(summary.skipped)}  "
        f"failed: {len(summary.failed)}  size: {_gb(summary.bytes)} in {folder}"
    ]
    if summary.over_cap:
        lines.append(
            f"{len(summary.over_cap)} entries have more candidate frames than cache.max_candidates: "
            "their random draws are decoded at run time"
        )
    lines += [f"  {key}: {reason}" for key, reason in list(summary.failed.items())[:SHOWN]]
    if len(summary.failed) > SHOWN:
        lines.append(f"  ... and {len(summary.failed) - SHOWN} more in {folder / 'failures.txt'}")
    return "\n".join(lines)


def cache_frames(cfg: DictConfig) -> CacheSummary:
    """Builds (or resumes) the cache at `cfg.data.frame_cache` for the config's data settings and splits."""
    check_config(cfg, "cache")
    if not cfg.data.frame_cache:
        raise ConfigError("data.frame_cache is not set: give the cache folder, e.g. data.frame_cache=/fast/cache")
    folder = Path(cfg.data.frame_cache)
    data = build(cfg, "data", frame_cache=None)  # the cache is being built: the data object must not open it
    try:
        records = [r for split in cfg.cache.splits for r in data.records(split)]
    except ValueError as err:  # an unknown split name for this benchmark
        raise ConfigError(str(err)) from err
    requests = data.cache_requests(records)
    spec, cap = data.cache_spec(), cfg.cache.max_candidates
    compress, quality = cfg.cache.compress, cfg.cache.quality
    estimate, sampled = estimate_bytes(requests, spec, cap, compress=compress, quality=quality)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    print(
        f"{len(requests)} videos of {', '.join(cfg.cache.splits)} ({data.benchmark}), frames in {spec.form} form "
        f"({spec.max_frames} frames, {spec.framerate or 'all'} fps, sampling {'/'.join(spec.modes)}"
        f"{f', JPEG quality {quality}' if compress == 'jpeg' else ''}): estimated "
        f"{_gb(estimate)} (from {sampled} sampled videos), {_gb(free)} free in {folder}",
        flush=True,
    )
    summary = build_frame_cache(
        requests,
        folder,
        spec,
        workers=cfg.cache.workers,
        max_candidates=cap,
        shard_bytes=int(cfg.cache.shard_gb * 2**30),
        progress=cfg.cache.progress,
        compress=compress,
        quality=quality,
    )
    print(report(summary, folder))
    return summary


def _exit_status(cfg: DictConfig) -> None:
    if cache_frames(cfg).failed:
        raise SystemExit(1)


main = hydra_entry("cache_frames", _exit_status)


if __name__ == "__main__":
    main()
