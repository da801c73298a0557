"""DDP with MaskedSyncBatchNorm on CPU (gloo): a padded model trained by 2 processes, and the bytes its
batch norms exchange per training step.

    python examples/ddp_sync_batch_norm.py [--world 2] [--channels 64] [--steps 5]

Each process holds part of a padded batch; convert_sync_batchnorm turns the model's batch norms into
MaskedSyncBatchNorm, whose statistics are those of the valid positions of the whole global batch.
The collectives the norms issue are counted (payload elements and bytes each process contributes, per
step) by wrapping torch.distributed.all_gather and all_reduce; DDP's gradient all-reduce runs in its C++
reducer and is not among them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from typing import Dict, Iterator, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import masknorm


class Model(torch.nn.Module):
    """pointwise conv -> masked batch norm -> ReLU -> pointwise conv, over (B, C, L) with a (B, L) mask."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.inp = torch.nn.Conv1d(8, channels, 1)
        self.norm = masknorm.MaskedBatchNorm1d(channels)
        self.out = torch.nn.Conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x), mask)))[:, 0]


@contextlib.contextmanager
def counted_collectives(counts: List[Dict[str, int]]) -> Iterator[None]:
    """Record (name, elements, bytes) of every all_gather/all_reduce payload this process sends."""
    originals = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def wrap(name):
        def call(*args, **kwargs):
            tensor = args[1] if name == "all_gather" else args[0]
            counts.append({"op": name, "elements": tensor.numel(), "bytes": tensor.numel() * tensor.element_size()})
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def run(rank: int, world: int, port: int, channels: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial model on every process
    model = masknorm.MaskedSyncBatchNorm.convert_sync_batchnorm(Model(channels))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1 + rank)  # each process its own data
    for step in range(steps):
        x = torch.randn(4, 8, 50, generator=gen)
        lengths = torch.randint(5, 51, (4,), generator=gen)
        mask = torch.arange(50) < lengths[:, None]
        target = x[:, :2].sum(1)
        sent: List[Dict[str, int]] = []
        opt.zero_grad()
        with counted_collectives(sent):
            pred = ddp(x, mask)
            loss = torch.where(mask, (pred - target) ** 2, 0).sum() / mask.sum()
            loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if rank == 0:
        total = sum(c["bytes"] for c in sent)
        print(f"MaskedSyncBatchNorm({channels}), float32 input, {world} processes, last step, per process: "
              f"{[(c['op'], c['elements'], c['bytes']) for c in sent]}: {total} bytes contributed")
        torch_bytes = ((2 * channels + 1) + 2 * channels) * 4
        print(f"nn.SyncBatchNorm({channels}) (read from torch/nn/modules/_functions.py; on CPU it raises): "
              f"all_gather {2 * channels + 1} and all_reduce {2 * channels} float32 elements: {torch_bytes} bytes")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world, port, args.channels, args.steps), nprocs=args.world)


if __name__ == "__main__":
    main()
