"""Every scalar sent to the trackers also goes to `<run_dir>/metrics.jsonl`, so a run can be read without wandb."""

from __future__ import annotations

import json
import math
from pathlib import Path

from accelerate import Accelerator


class MetricsLog:
    """`log(values, step)`: Accelerate's `log` to every tracker, plus one JSON object per call appended to `path`
    (main process only) as {"step": step, **values}. Non-finite floats are written as strings ("nan", "inf"),
    since JSON has no literal for them."""

    def __init__(self, accelerator: Accelerator, path: Path | None):
        self.accelerator = accelerator
        self.path = Path(path) if path is not None else None

    def __call__(self, values: dict[str, float], step: int | None = None) -> None:
        self.accelerator.log(values, step=step)
        if self.path is None or not self.accelerator.is_main_process:
            return
        row = {"step": step} | {
            k: v if not isinstance(v, float) or math.isfinite(v) else str(v) for k, v in values.items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
