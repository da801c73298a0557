"""What the processes of tests/modules/test_modules_sync_batch_norm.py run: one spawn of gloo processes for every
case (starting processes costs tens of seconds on a loaded machine; a case costs milliseconds).

Imports torch and masknorm only, so that spawned processes start quickly. A case is a dict with a
"kind" (a function below), its "world" (it runs on ranks 0..world-1, in a subgroup when that is
fewer than all) and its data; each process returns {case name: its result, None where it took no
part, or ("error", type name, message)}.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import io
import pathlib
import socket
import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import masknorm
from masknorm import MaskedSyncBatchNorm

COLLECTIVE_TIMEOUT_S = 60  # a backstop: no case is meant to wait in a collective


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_module(dim: int, **kwargs) -> torch.nn.Module:
    """The MaskedBatchNorm*d that one process would use for x of rank `dim`."""
    cls = {2: masknorm.MaskedBatchNorm1d, 3: masknorm.MaskedBatchNorm1d, 4: masknorm.MaskedBatchNorm2d,
           5: masknorm.MaskedBatchNorm3d}[dim]
    return cls(**kwargs)


def run_module(module: torch.nn.Module, steps: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Forward and backward of each step's (x, mask, upstream gradient) through `module` (gradients
    accumulate over the steps); outputs and input gradients per step, then parameter grads and buffers."""
    outs, grads = [], []
    for step in steps:
        x = step["x"].clone().requires_grad_(True)
        out = module(x, step["mask"])
        out.backward(step["grad"])
        outs.append(out.detach())
        grads.append(x.grad)
    result = {"out": outs, "grad_x": grads}
    for name in ("weight", "bias"):
        param = getattr(module, name)
        result[f"grad_{name}"] = None if param is None or param.grad is None else param.grad.clone()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        buffer = getattr(module, name)
        result[name] = None if buffer is None else buffer.clone()
    return result


def _module_for(case: Dict[str, Any], rank: int, group: Any) -> torch.nn.Module:
    options = dict(case["options"], process_group=group)
    if "num_features_per_rank" in case:
        options["num_features"] = case["num_features_per_rank"][rank]
    module = MaskedSyncBatchNorm(**options)
    if module.weight is not None:
        with torch.no_grad():
            module.weight.copy_(case["weight"][: module.num_features])
            module.bias.copy_(case["bias"][: module.num_features])
    return module


def forward_backward(rank: int, case: Dict[str, Any], group: Any) -> Dict[str, Any]:
    """MaskedSyncBatchNorm on this process's share of each step."""
    module = _module_for(case, rank, group)
    if "masked_per_rank" in case:
        module.masked = case["masked_per_rank"][rank]
    return run_module(module, [step[rank] for step in case["steps"]])


class PaddedModel(torch.nn.Module):
    """pointwise conv -> batch norm (masked) -> ReLU -> pointwise conv over (B, C, L) with a (B, L) mask
    (pointwise: padding never reaches a valid position except through the norm's statistics)."""

    def __init__(self, norm: torch.nn.Module, channels: int = 4) -> None:
        super().__init__()
        self.inp = torch.nn.Conv1d(2, channels, 1)
        self.norm = norm
        self.out = torch.nn.Conv1d(channels, 1, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x), mask)))[:, 0]


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, total_valid: int) -> torch.Tensor:
    """Sum over valid positions of squared errors / the global number of valid positions (so the
    processes' losses add up to the whole batch's)."""
    return torch.where(mask, (pred - target) ** 2, 0).sum() / total_valid


def train(model: torch.nn.Module, batches: List[Dict[str, Any]], totals: List[int], scale: float) -> List[float]:
    """SGD on the batches (totals: each whole batch's number of valid positions); the loss is multiplied
    by `scale` (the world size under DDP, whose gradients are averages over processes); returns the
    unscaled losses."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for batch, total_valid in zip(batches, totals):
        opt.zero_grad()
        loss = masked_loss(model(batch["x"], batch["mask"]), batch["target"], batch["mask"], total_valid)
        (loss * scale).backward()
        opt.step()
        losses.append(loss.item())
    return losses


def ddp_training(rank: int, case: Dict[str, Any], group: Any) -> Dict[str, Any]:
    """DDP over a PaddedModel converted with MaskedSyncBatchNorm.convert_sync_batchnorm."""
    model = PaddedModel(masknorm.MaskedBatchNorm1d(4)).double()
    model.load_state_dict(case["state"])
    model = MaskedSyncBatchNorm.convert_sync_batchnorm(model, group)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=group)
    losses = train(ddp, [b[rank] for b in case["batches"]], case["valid"], float(case["world"]))
    local = torch.tensor(losses, dtype=torch.float64)
    dist.all_reduce(local, group=group)
    return {"losses": local.tolist(), "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _example_module() -> Any:
    """examples/ddp_sync_batch_norm.py, imported by path (examples/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "examples" / "ddp_sync_batch_norm.py"
    spec = importlib.util.spec_from_file_location("ddp_sync_batch_norm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collectives(rank: int, case: Dict[str, Any], group: Any) -> List[Dict[str, int]]:
    """The collectives of the second forward + backward of a MaskedSyncBatchNorm (the first also checks
    num_features across the group), counted with the example's counted_collectives."""
    module = MaskedSyncBatchNorm(case["channels"], process_group=group)
    step = case["steps"][rank]
    sent: List[Dict[str, int]] = []
    for counted in (False, True):
        with _example_module().counted_collectives(sent) if counted else contextlib.nullcontext():
            module(step["x"].requires_grad_(True), step["mask"]).backward(step["grad"])
    return sent


KINDS = {"forward_backward": forward_backward, "ddp_training": ddp_training, "collectives": collectives}


def _worker(rank: int, world: int, port: int, cases: Dict[str, Dict[str, Any]], queue: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    groups = {w: dist.new_group(list(range(w))) if w < world else dist.group.WORLD for w in range(2, world + 1)}
    results: Dict[str, Any] = {}
    for name, case in cases.items():
        if rank >= case["world"]:
            results[name] = None
            continue
        try:
            results[name] = KINDS[case["kind"]](rank, case, groups[case["world"]])
        except Exception as error:  # reported to the test, which decides
            results[name] = ("error", type(error).__name__, str(error))
    buffer = io.BytesIO()
    torch.save(results, buffer)  # bytes: tensors put on a queue would be shared memory, gone with the process
    queue.put((rank, buffer.getvalue()))
    dist.destroy_process_group()


def run_world(world: int, cases: Dict[str, Dict[str, Any]], timeout_s: float) -> List[Dict[str, Any]]:
    """Every case on `world` spawned processes; per rank its results. TimeoutError (processes
    killed) if they have not all reported within timeout_s."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, cases, queue), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    results: Dict[int, Dict[str, Any]] = {}
    try:
        while len(results) < world:
            if not queue.empty():
                rank, data = queue.get()
                results[rank] = torch.load(io.BytesIO(data), weights_only=False)
            elif time.monotonic() > deadline:
                raise TimeoutError(f"{world} processes did not finish within {timeout_s} s (hang?)")
            elif any(p.exitcode not in (None, 0) for p in procs):
                raise RuntimeError(f"a process died: exit codes {[p.exitcode for p in procs]}")
            else:
                time.sleep(0.02)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]
