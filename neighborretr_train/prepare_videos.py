"""Re-encode a folder of videos into small H.264 mp4 files for training (usual setting: 3 fps, short side 224).

    neighborretr-prepare-videos data/msrvtt/videos_raw data/msrvtt/videos
    neighborretr-prepare-videos SRC DST --fps 1 --short-side 224 --workers 8

The folder tree is mirrored (SRC/a/b.avi -> DST/a/b.mp4); audio is dropped. Re-running resumes: outputs
that already decode are skipped. DST/prepare_videos.json records the settings. Exit status 1 when any
file failed (each is listed with its reason).
"""

from __future__ import annotations

import argparse
import sys

from neighborretr.data.prepare import PrepareSummary, prepare_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, one per argument of ``prepare_folder``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder of source videos (searched recursively)")
    parser.add_argument("dst", help="output folder (created if needed)")
    parser.add_argument("--fps", type=float, default=3, help="output frame rate (default: %(default)s)")
    parser.add_argument(
        "--short-side", type=int, default=224, help="output short side in pixels, even (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=None, help="conversion processes (default: all CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def report(summary: PrepareSummary) -> str:
    """The counts, then one ``path: reason`` line per failure."""
    lines = [
        f"converted: {len(summary.converted)}  skipped (already done): {len(summary.skipped)}  "
        f"failed: {len(summary.failed)}"
    ]
    lines += [f"{path}: {reason}" for path, reason in summary.failed.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Convert the folder, print the summary; returns the exit status."""
    args = parse_args(argv)
    try:
        summary = prepare_folder(
            args.src,
            args.dst,
            fps=args.fps,
            short_side=args.short_side,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (FileNotFoundError, ValueError) as err:  # bad arguments or a destination with other settings
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report(summary))
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
