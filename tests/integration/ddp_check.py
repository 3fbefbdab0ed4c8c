"""Run under `torchrun --standalone --nproc_per_node 2 ddp_check.py OUT.pt LOSS GATHER MICRO`: one training step's
backward of the tiny model through the recipe's TrainStep (prepared by Accelerate, i.e. DDP) where each process
holds half of a fixed global batch, in MICRO micro-batches; rank 0 saves the loss and the gradients.
LOSS is "infonce" or "neighborretr" (with a fixed memory bank, identical on both ranks)."""

import sys

import torch
from accelerate import Accelerator

from neighborretr.train_step import TrainStep, backward_step
from tests.integration.test_distributed import global_batch, make_model, make_objective


def main(out: str, loss_name: str, gather: str = "sum", micro: str = "1") -> None:
    accelerator = Accelerator(cpu=True)
    step = TrainStep(
        make_model(high_level=loss_name == "neighborretr"),
        make_objective(loss_name),
        sum_gathered_grads=gather == "sum",
    )
    step = accelerator.prepare(step)
    batch = global_batch()
    half = len(batch["text_ids"]) // accelerator.num_processes
    mine = {k: v[accelerator.process_index * half : (accelerator.process_index + 1) * half] for k, v in batch.items()}
    losses, _ = backward_step(accelerator, step, mine, int(micro))
    model = accelerator.unwrap_model(step).model
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if accelerator.is_main_process:
        torch.save({"world": accelerator.num_processes, "loss": losses["loss"], "grads": grads}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
