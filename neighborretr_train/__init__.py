"""The recipes of neighborretr: Hydra config -> objects -> run (the open_clip / open_clip_train split).

`neighborretr` is the library and never reads a config; this package is the only code that does. Call
`train(cfg)` / `evaluate(cfg)` in-process with a composed config, or use the console commands
(`neighborretr-train`, `neighborretr-eval`, ...) and `scripts/`, which are thin launchers of `cli`.
"""

from pathlib import Path


def config_dir() -> Path:
    """The configs shipped inside the wheel, or the checkout's top-level `configs/` in a development install."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if (packaged / "train.yaml").is_file() else Path(__file__).resolve().parent.parent / "configs"
