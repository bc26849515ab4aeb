"""DistributedDataParallel: a model with fused layers trains in 2 CPU processes (gloo) exactly as
one process does on the whole batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_rnn

WORLD_SIZE = 2
STEPS = 3


class _Tagger(nn.Module):
    """A small sequence tagger: bidirectional LSTM, GRU, linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = fused_rnn.LSTM(4, 5, bidirectional=True, proj_size=3, batch_first=True)
        self.gru = fused_rnn.GRU(6, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y)


def _data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, 2 * WORLD_SIZE, 7, 4, dtype=torch.float64, generator=generator)
    target = torch.randn(STEPS, 2 * WORLD_SIZE, 7, 2, dtype=torch.float64, generator=generator)
    return x, target


def _train(model, x, target):
    """SGD steps on a mean loss; returns the gradients of every step and the final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    grads = []
    for step in range(STEPS):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x[step]), target[step]).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return grads, [p.detach().clone() for p in model.parameters()]


def _worker(rank, init_file, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(_Tagger().double())
    x, target = _data()
    shard = slice(2 * rank, 2 * rank + 2)  # each process gets its share of every batch
    grads, params = _train(model, x[:, shard], target[:, shard])
    if rank == 0:
        torch.save({"grads": grads, "params": params}, result_file)
    dist.barrier()  # both are done with the process group
    # Leave without tearing anything down: gloo's teardown (destroy_process_group, or the static
    # destructors at exit) has now and then aborted a process after all the work was done
    # ("terminate called without an active exception"), twice in CI. An exception above still
    # reaches mp.spawn, which then stops the other process.
    os._exit(0)


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    init_file, result_file = tmp_path / "init", tmp_path / "result.pt"
    mp.spawn(_worker, args=(str(init_file), str(result_file)), nprocs=WORLD_SIZE, join=True)
    ddp = torch.load(result_file)

    torch.manual_seed(0)
    grads, params = _train(_Tagger().double(), *_data())
    # DDP averages the processes' gradients: with equal shares, the gradient of the whole batch.
    for step, (ddp_step, step_grads) in enumerate(zip(ddp["grads"], grads)):
        for a, e in zip(ddp_step, step_grads):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"step {step}: {m}")
    for a, e in zip(ddp["params"], params):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
