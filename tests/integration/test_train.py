"""The training and evaluation entry points end to end on a tiny generated dataset."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neighborretr.data.annotations import parse_msrvtt
from neighborretr.data.dataset import VideoTextDataset
from neighborretr.models.builders import tiny
from neighborretr.objectives import InfoNCEObjective
from neighborretr.optim import create_optimizer
from tests.conftest import INFONCE, NEIGHBORRETR, TINY_OVERRIDES, run_script

pytestmark = pytest.mark.integration


def _runs(output_root: Path) -> list[Path]:
    return sorted((output_root / "synthetic_tiny").glob("*"))


def test_a_few_steps_lower_the_loss(tiny_synthetic):
    torch.manual_seed(0)
    records = parse_msrvtt(tiny_synthetic, "train")[:16:2]
    ds = VideoTextDataset(records, tiny_synthetic / "videos", max_words=16, max_frames=4, image_size=32)
    batch = torch.utils.data.default_collate([ds[i] for i in range(len(ds))])
    model = tiny(image_size=32, width=64, embed_dim=64)
    optimizer = create_optimizer(model, "adamw", lr=1e-3, weight_decay=0.0)
    criterion, losses = InfoNCEObjective(), []
    for _ in range(12):
        features = model(batch["text_ids"], batch["text_mask"], batch["video"], batch["video_mask"])
        loss = criterion(model, features)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_train_then_evaluate_with_wandb_offline(tiny_synthetic, tmp_path):
    out = tmp_path / "outputs"
    result = run_script(
        "train.py",
        [
            *TINY_OVERRIDES,
            *NEIGHBORRETR,
            f"data.root={tiny_synthetic}",
            f"output_root={out}",
            "logger=wandb",
            "logger.mode=offline",
        ],
        cwd=tmp_path,
    )
    (run,) = _runs(out)
    results = json.loads((run / "results.json").read_text())
    assert set(results["test"]) == {"t2v", "v2t"}
    assert set(results["test"]["t2v"]) == {
        "R@1",
        "R@5",
        "R@10",
        "MdR",
        "MnR",
        "skewness",
        "hub_occurrence",
        "antihub_occurrence",
        "k",
    }
    assert results["best_epoch"] in (0, 1) and len(results["history"]) == 2
    assert "R@1" in result.stdout and "t2v" in result.stdout  # the printed table
    assert (run / "config.yaml").is_file() and (run / "best" / "model.pt").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "a wandb offline run folder is written"
    assert len(list((run / "checkpoints").glob("step_*"))) == 2  # keep_checkpoints

    # every normalisation is reported for both directions, with its β/τ chosen on the validation split
    methods = {"none", "is", "dis", "dualis", "dualdis", "sn", "dbsn", "nnn"}
    assert set(results["normalized"]) == methods and set(results["normalization_params"]) == methods
    assert results["normalization_params"]["dualis"]["t2v"].keys() == {"beta_query_bank", "beta_gallery_bank"}
    assert results["normalization_params"]["nnn"]["v2t"].keys() == {"nnn_alpha", "nnn_k"}
    assert (run / "test_k_occurrence_t2v.png").read_bytes()[:4] == b"\x89PNG"
    (cache,) = (run / "best").glob("bank_features_*.pt")
    cached_at = cache.stat().st_mtime_ns

    evaluated = run_script("evaluate.py", [f"ckpt={run}", f"output_root={out}", "eval.k=3"], cwd=tmp_path)
    (eval_dir,) = sorted((out / "eval").glob("*"))
    metrics = json.loads((eval_dir / "test_metrics.json").read_text())
    # the evaluation script reproduces the training run's final test numbers from the same weights and banks
    for method in methods:
        for direction in ("t2v", "v2t"):
            assert metrics["rows"][method][direction] == pytest.approx(results["normalized"][method][direction])
    assert cache.stat().st_mtime_ns == cached_at  # the banks came from the cache, not re-encoded
    assert "dualdis" in evaluated.stdout and "Skew@3" in evaluated.stdout


@pytest.mark.parametrize("loss", [INFONCE, NEIGHBORRETR], ids=["infonce", "neighborretr"])
def test_killed_run_resumes_to_the_same_parameters(tiny_synthetic, tmp_path, loss):
    common = [
        *loss,
        *TINY_OVERRIDES,
        f"data.root={tiny_synthetic}",
        "trainer.checkpoint_every_steps=2",
        "trainer.keep_checkpoints=20",
    ]
    run_script("train.py", [*common, f"output_root={tmp_path / 'a'}"], cwd=tmp_path)
    killed = run_script(
        "train.py", [*common, f"output_root={tmp_path / 'b'}", "trainer.abort_after_steps=7"], cwd=tmp_path, check=False
    )
    assert killed.returncode != 0
    (run_b,) = _runs(tmp_path / "b")
    assert not (run_b / "results.json").exists()
    # 5 steps per epoch: step 6 is a mid-epoch checkpoint (one batch into epoch 1)
    assert (run_b / "checkpoints" / "step_00000006").is_dir()
    run_script("train.py", [*common, f"output_root={tmp_path / 'b'}", "trainer.resume=latest"], cwd=tmp_path)
    (run_a,) = _runs(tmp_path / "a")
    final_a = load_file(run_a / "checkpoints" / "step_00000010" / "model.safetensors")
    final_b = load_file(run_b / "checkpoints" / "step_00000010" / "model.safetensors")
    assert final_a.keys() == final_b.keys()
    for name in final_a:
        torch.testing.assert_close(final_b[name], final_a[name], atol=1e-5, rtol=1e-5, msg=name)
    assert (
        json.loads((run_b / "results.json").read_text())["test"]
        == json.loads((run_a / "results.json").read_text())["test"]
    )


def test_two_process_run_shares_one_run_dir(tiny_synthetic, tmp_path):
    out = tmp_path / "outputs"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = run_script(
        "train.py",
        [
            *TINY_OVERRIDES,
            *NEIGHBORRETR,
            f"data.root={tiny_synthetic}",
            f"output_root={out}",
            "trainer.cpu=true",
            "trainer.epochs=1",
        ],
        cwd=tmp_path,
        launcher=launcher,
    )
    assert "2 process(es)" in result.stdout
    (run,) = _runs(out)  # exactly one run folder for both ranks
    assert (run / "results.json").is_file() and (run / "config.yaml").is_file()


@pytest.fixture
def damaged(tiny_synthetic, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(tiny_synthetic, root)
    return root


def test_missing_and_corrupt_videos_stop_the_run_with_their_paths(damaged, tmp_path):
    (damaged / "videos" / "video3.mp4").unlink()
    (damaged / "videos" / "video5.mp4").write_bytes(b"not a video")
    args = [*TINY_OVERRIDES, *INFONCE, f"data.root={damaged}", f"output_root={tmp_path / 'out'}"]
    result = run_script("train.py", args, cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "2 video(s) are missing or cannot be decoded" in result.stderr
    assert "video3: no file for video 'video3'" in result.stderr
    assert "video5: " in result.stderr and "video5.mp4: cannot decode" in result.stderr
    assert "data.skip_bad_videos=true" in result.stderr
    skipped = run_script("train.py", [*args, "data.skip_bad_videos=true", "trainer.epochs=1"], cwd=tmp_path)
    assert "skipping 2 bad video(s)" in skipped.stdout + skipped.stderr


def test_malformed_annotation_and_unknown_key_fail_clearly(damaged, tmp_path):
    (damaged / "MSRVTT_data.json").write_text('{"sentences": [{"video_id": "video0", "caption": "x"},')
    args = [*TINY_OVERRIDES, *INFONCE, f"data.root={damaged}", f"output_root={tmp_path / 'out'}"]
    result = run_script("train.py", args, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "MSRVTT_data.json is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr  # a user error, not a crash
    typo_args = [
        *TINY_OVERRIDES,
        *INFONCE,
        f"data.root={damaged}",
        f"output_root={tmp_path / 'typo'}",
        "trainer.epoch=3",
    ]
    typo = run_script("train.py", typo_args, cwd=tmp_path, check=False)
    assert typo.returncode != 0 and "trainer.epoch" in typo.stderr
    assert not (tmp_path / "typo").exists()  # refused before any work
    added = run_script("train.py", [*typo_args[:-1], "+trainer.epoch=3"], cwd=tmp_path, check=False)
    assert added.returncode == 1
    assert added.stderr == "error: trainer.epoch: unknown key; did you mean trainer.epochs?\n"
    assert not (tmp_path / "typo").exists()  # not even an empty folder


def test_grad_accumulation_and_bf16_autocast_run(tiny_synthetic, tmp_path):
    out = tmp_path / "outputs"
    args = [*TINY_OVERRIDES, *INFONCE, f"data.root={tiny_synthetic}", f"output_root={out}", "trainer.epochs=1"]
    result = run_script("train.py", [*args, "trainer.grad_accum=2", "trainer.mixed_precision=bf16"], cwd=tmp_path)
    # 40 pairs, global batch 8 = 2 micro-batches of 4 per optimiser step: 5 optimiser steps in the epoch
    assert "5 optimiser steps" in result.stdout
    (run,) = _runs(out)
    assert (run / "checkpoints" / "step_00000005").is_dir()
    bad = run_script("train.py", [*args, "trainer.grad_accum=3"], cwd=tmp_path, check=False)
    assert bad.returncode != 0 and "not divisible" in bad.stderr
