"""Small parts of the recipe and the loop: refusals with clear messages, the config commands, the metrics log and
a lazily shaped memory bank restored from a checkpoint."""

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from omegaconf import OmegaConf

from neighborretr.engine import FitConfig, TrainState, fit
from neighborretr.memory_bank import MemoryBank
from neighborretr.metrics_log import MetricsLog, read_metrics
from neighborretr.models.builders import tiny
from neighborretr.objectives import NeighborRetrObjective
from neighborretr.train_step import TrainStep
from neighborretr_train import common, config_dir
from neighborretr_train.configs_cli import copy_config, list_configs
from neighborretr_train.configs_cli import main as configs_main


def test_the_loop_refuses_an_objective_with_a_bank_but_no_refill_loader(tmp_path):
    step = TrainStep(tiny(image_size=32, width=32, embed_dim=32, heads=2, high_level=True), NeighborRetrObjective())
    with pytest.raises(ValueError, match="refills its memory bank from 15 training batches every epoch"):
        fit(Accelerator(cpu=True), step, None, None, [], None, TrainState(), FitConfig(run_dir=tmp_path), None)


@pytest.mark.parametrize("engine", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_sharded_engines_are_refused_up_front(monkeypatch, engine):
    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: engine))
    trainer = OmegaConf.create({"mixed_precision": None, "cpu": True})
    with pytest.raises(common.ConfigError, match="not supported; use plain data parallel"):
        common.setup_accelerator(trainer)


def test_configs_are_listed_and_copied_without_overwriting(tmp_path, capsys):
    groups = list_configs()
    assert "msrvtt_vitb32" in groups["experiment"] and "train" in groups[""]
    with pytest.raises(ValueError, match="no config group 'nope'"):
        list_configs("nope")
    dest = copy_config("loss/neighborretr", tmp_path)
    assert dest.read_text() == (config_dir() / "loss/neighborretr.yaml").read_text()
    with pytest.raises(FileExistsError):
        copy_config("loss/neighborretr", tmp_path)
    assert configs_main(["cp", "experiment/nope", str(tmp_path)]) == 2
    assert "no config 'experiment/nope'" in capsys.readouterr().err
    assert configs_main(["cp", "all", str(tmp_path / "tree")]) == 0
    assert (tmp_path / "tree/experiment/msrvtt_vitb32.yaml").is_file()


def test_every_log_call_is_one_json_line_with_its_step(tmp_path):
    log = MetricsLog(Accelerator(cpu=True), tmp_path / "m" / "metrics.jsonl")
    log({"train/loss": 1.5, "epoch": 0}, step=1)
    log({"train/loss": math.nan}, step=2)
    rows = read_metrics(tmp_path / "m" / "metrics.jsonl")
    assert rows == [{"step": 1, "train/loss": 1.5, "epoch": 0}, {"step": 2, "train/loss": "nan"}]
    json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[1])  # strict JSON, no NaN literal


def test_a_lazily_shaped_bank_takes_its_shapes_from_a_checkpoint():
    full = MemoryBank(4)
    assert not full.allocated and len(full) == 0 and full.get()["text"].shape == (0,)
    full.enqueue(torch.ones(3, 5, 2), torch.ones(3, 5), -torch.ones(3, 2, 2), torch.ones(3, 2), torch.arange(3))
    restored = MemoryBank(4)
    restored.load_state_dict(full.state_dict())
    for key, value in full.get().items():
        assert torch.equal(restored.get()[key], value), key
    empty = MemoryBank(4)
    empty.load_state_dict(MemoryBank(4).state_dict())  # a checkpoint taken before the first batch
    assert not empty.allocated and len(empty) == 0


@pytest.mark.parametrize(("capacity", "batches"), [(20, 5), (16, 5), (64, 3), (3, 4)])
def test_a_refill_without_the_batches_the_bank_would_drop_ends_with_the_same_bank(capacity, batches):
    from neighborretr.data.module import VideoTextData

    data = VideoTextData("msrvtt", "unused", "unused", batch_size=8, num_workers=0, seed=3)
    dataset = [{"caption_index": torch.tensor(i)} for i in range(45)]  # 5 full batches and a partial one

    def bank_after(loader) -> MemoryBank:
        bank = MemoryBank(capacity, (1, 1), (1, 1))
        for batch in loader:
            n = len(batch["caption_index"])
            bank.enqueue(
                torch.zeros(n, 1, 1), torch.ones(n, 1), torch.zeros(n, 1, 1), torch.ones(n, 1), batch["caption_index"]
            )
        return bank

    full = data.refill_loader(dataset, batches, 1)
    short = data.refill_loader(dataset, batches, 1, keep=capacity)
    assert len(short) == min(len(full), -(-capacity // 8))
    assert torch.equal(bank_after(short).get()["ids"], bank_after(full).get()["ids"])
    assert len(bank_after(full)) == min(capacity, 8 * min(batches, 5))


def test_a_run_saved_by_an_older_version_is_refused_with_the_fix(tmp_path):
    from neighborretr_train.evaluate import run_config

    (tmp_path / "config.yaml").write_text("data:\n  benchmark: msrvtt\n  root: data/x\nmodel:\n  _target_: x\n")
    cfg = OmegaConf.create({"data": {}, "eval": {}, "trainer": {"mixed_precision": None, "cpu": False}})
    with pytest.raises(common.ConfigError, match="_target_: neighborretr.data.module.VideoTextData"):
        run_config(cfg, tmp_path)
