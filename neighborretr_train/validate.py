"""Check a data config's annotations against its video folder: neighborretr-validate-data data=msrvtt ...

Every split's annotations are parsed; every distinct video is located (any extension or naming variant the
parser accepts) and the frames evaluation would read are decoded. Missing, zero-length (0 bytes or no frames),
corrupt and duplicated entries are errors; several files for one id and repeated captions are notes. A table
per split goes to the console, every finding to problems.csv (and the counts to summary.json) in the output
folder. Exit status 1 when there is any error (or the annotations cannot be read), 0 otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from neighborretr.data.validation import (
    duplicate_problems,
    format_table,
    summary_rows,
    video_problems,
    write_problems,
)
from neighborretr_train.common import ConfigError, build, claim_run_dir, hydra_entry
from neighborretr_train.schema import check_config

log = logging.getLogger("neighborretr")
SHOWN = 50  # problems printed on the console; the CSV has all of them


def validate(cfg: DictConfig) -> int:
    """Checks every split; prints the tables, writes problems.csv and summary.json; returns the error count."""
    check_config(cfg, "validate")
    data = build(cfg, "data")
    out = claim_run_dir(cfg, Path(cfg.output_root) / "validate" / data.benchmark)
    OmegaConf.save(cfg, out / "config.yaml", resolve=True)
    try:
        splits = {split: data.records(split) for split in cfg.splits}
    except ValueError as err:  # an unknown split name for this benchmark
        raise ConfigError(str(err)) from err
    problems = duplicate_problems(splits)
    problems += video_problems(
        splits,
        data.videos,
        backend=data.backend,
        max_frames=cfg.max_frames or data.max_frames,
        framerate=data.video_framerate,
        workers=cfg.workers,
    )
    problems.sort(key=lambda p: (not p.is_error, p.kind, p.split, p.video_id))
    rows = summary_rows(splits, problems)
    print(f"{cfg.data.benchmark} at {cfg.data.root}, videos in {cfg.data.video_dir}\n{format_table(rows)}")
    for p in problems[:SHOWN]:
        print(f"  {p.kind:<16} {p.split:<5} {p.video_id}: {p.detail}")
    if len(problems) > SHOWN:
        print(f"  ... and {len(problems) - SHOWN} more")
    write_problems(problems, out / "problems.csv")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    errors = sum(p.is_error for p in problems)
    print(f"{errors} error(s), {len(problems) - errors} note(s); full list: {out / 'problems.csv'}")
    return errors


def _exit_status(cfg: DictConfig) -> None:
    if validate(cfg):
        raise SystemExit(1)


main = hydra_entry("validate", _exit_status)


if __name__ == "__main__":
    main()
