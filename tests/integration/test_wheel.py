"""The wheel carries the recipe and its configs: installed (not editable) beside nothing of the checkout, its
commands list the configs, copy one out, and train + evaluate from an empty folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import NEIGHBORRETR, ROOT, TINY_OVERRIDES

# one worker builds the wheel: `pip wheel` of the checkout writes its build/ folder
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("wheel")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project's wheel unpacked into a folder of its own (its dependencies come from this environment)."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(base), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = base.glob("neighborretr-*.whl")
    target = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    return target


def _run(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    # The unpacked wheel comes first on the path, so neither the checkout nor its editable install is imported.
    env = os.environ | {"PYTHONPATH": str(installed), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_wheel_ships_its_configs_and_trains_from_an_empty_folder(installed, tiny_synthetic, tmp_path):
    where = _run(installed, tmp_path, "-c", "import neighborretr_train as m; print(m.__file__, m.config_dir())")
    module, configs = where.stdout.split()
    assert module.startswith(str(installed)) and Path(configs) == installed / "neighborretr_train" / "configs"
    listed = _run(installed, tmp_path, "-m", "neighborretr_train.configs_cli", "ls", "experiment").stdout
    assert "msrvtt_vitb32" in listed and "synthetic_tiny" in listed
    _run(
        installed,
        tmp_path,
        "-m",
        "neighborretr_train.configs_cli",
        "cp",
        "experiment/synthetic_tiny",
        "mine/experiment/x.yaml",
    )
    assert (tmp_path / "mine/experiment/x.yaml").read_text().startswith("# @package _global_")

    overrides = [*TINY_OVERRIDES, *NEIGHBORRETR, f"data.root={tiny_synthetic}", "trainer.epochs=1"]
    _run(installed, tmp_path, "-m", "neighborretr_train.train", "--config-dir", "mine", "experiment=x", *overrides[1:])
    (run,) = (tmp_path / "outputs" / "synthetic_tiny").glob("*")  # written in the current folder
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {"t2v", "v2t"}
    evaluated = _run(installed, tmp_path, "-m", "neighborretr_train.evaluate", f"ckpt={run}", "eval.k=3")
    assert "none" in evaluated.stdout and "R@1" in evaluated.stdout
