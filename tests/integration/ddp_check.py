"""Run under `torchrun --standalone --nproc_per_node 2 ddp_check.py OUT.pt LOSS`: one training-loss backward of the
tiny model where each process holds half of a fixed global batch; rank 0 saves the loss and the gradients.
LOSS is "infonce" or "neighborretr" (with a fixed memory bank, identical on both ranks)."""

import sys

import torch
from accelerate import Accelerator

from neighborretr.distributed import gather_features
from tests.integration.test_distributed import criterion_and_bank, global_batch, make_model


def main(out: str, loss_name: str, gather: str = "sum") -> None:
    accelerator = Accelerator(cpu=True)
    criterion, bank = criterion_and_bank(loss_name)
    model = accelerator.prepare(make_model(high_level=loss_name == "neighborretr"))
    batch = global_batch()
    half = len(batch["text_ids"]) // accelerator.num_processes
    mine = {k: v[accelerator.process_index * half : (accelerator.process_index + 1) * half] for k, v in batch.items()}
    features = model(mine["text_ids"], mine["text_mask"], mine["video"], mine["video_mask"])
    gathered = gather_features(features, sum_grads=gather == "sum")
    loss = criterion(accelerator.unwrap_model(model), gathered, bank)["loss"]
    accelerator.backward(loss)
    grads = {n: p.grad.clone() for n, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
    if accelerator.is_main_process:
        torch.save({"world": accelerator.num_processes, "loss": loss.detach(), "grads": grads}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
