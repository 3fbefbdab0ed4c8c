"""Generate the built-in synthetic text-video benchmark (MSR-VTT file format).

    neighborretr-make-synthetic                            # 1000 train / 200 test clips into data/synthetic
    neighborretr-make-synthetic --root /tmp/tiny --num-train 32 --num-test 16
    neighborretr-make-synthetic --hubs                     # the hub-prone variant: 1000 / 1000 into data/synthetic_hubs

Re-running with the same settings returns at once; any changed setting regenerates the folder.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace

from neighborretr.data.synthetic import generate_synthetic_msrvtt
from neighborretr.data.synthetic_hubs import HubKnobs, generate_hub_prone_msrvtt

_KNOBS = HubKnobs()
_FLOAT_KNOBS = [f.name for f in fields(HubKnobs) if isinstance(getattr(_KNOBS, f.name), float)]
_GENERATOR_ARGS = ["num_train", "num_test", "captions_per_video", "frame_size", "num_frames", "fps", "seed", "workers"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags, one per argument of ``generate_synthetic_msrvtt``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root", default=None, help="output folder (default: data/synthetic, with --hubs data/synthetic_hubs)"
    )
    parser.add_argument("--num-train", type=int, default=1000, help="train clips (default: %(default)s)")
    # The hub-prone set's default gallery is MSR-VTT 1k-A size: at 200 clips a model that learns shows little hubness.
    parser.add_argument("--num-test", type=int, default=None, help="test clips (default: 200, with --hubs 1000)")
    parser.add_argument(
        "--captions-per-video", type=int, default=5, help="captions per train clip (default: %(default)s)"
    )
    parser.add_argument("--frame-size", type=int, default=64, help="frame height = width, even (default: %(default)s)")
    parser.add_argument("--num-frames", type=int, default=16, help="frames per clip (default: %(default)s)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate of the mp4 files (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed; fixes captions and pixels (default: %(default)s)"
    )
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: all CPUs)")
    hubs = parser.add_argument_group("hub-prone variant (neighborretr/data/synthetic_hubs.py explains each knob)")
    hubs.add_argument("--hubs", action="store_true", help="generate the hub-prone variant")
    for knob in _FLOAT_KNOBS:  # one flag per number-valued knob, named after it
        default = getattr(_KNOBS, knob)
        hubs.add_argument(f"--{knob.replace('_', '-')}", type=float, default=default, help="(default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Generate the dataset and print its summary as JSON."""
    args = parse_args(argv)
    # These flags share the generators' argument names; one left unset (None) takes that generator's default.
    given = {name: getattr(args, name) for name in _GENERATOR_ARGS if getattr(args, name) is not None}
    root = args.root or ("data/synthetic_hubs" if args.hubs else "data/synthetic")
    common = {"root": root, **given, "progress": not args.no_progress}
    if args.hubs:
        knobs = replace(_KNOBS, **{knob: getattr(args, knob) for knob in _FLOAT_KNOBS})
        summary = generate_hub_prone_msrvtt(knobs=knobs, **common)
    else:
        summary = generate_synthetic_msrvtt(**common)
    print(json.dumps(summary, indent=2))
    return summary


def cli() -> None:
    """Console entry point (neighborretr-make-synthetic): exit status 0 on success."""
    main()


if __name__ == "__main__":
    cli()
