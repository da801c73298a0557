"""`masknorm bench`: masked_norm against torch's native kernels and a plain-torch masked norm.

Each case times forward + backward of the implementations interleaved in one process (so
machine load hits all alike), reports medians, their spread and ratios to torch's unmasked
layer (flagging masknorm above the 1.2x goal), and measures the bytes autograd saves for backward
relative to the size of x. Cases: padded-token layer norm (float32 large and small, bfloat16
small), batch norm, group and instance norm over time (wav2vec2's (8, 32, 1599), float32 and
bfloat16), RMS norm with a token mask, layer norm with an elementwise mask, a conformer block (bench_conformer.py); --compiled adds
torch.compile of the module cases on both sides. On CPU, the small-input cases follow
(bench_small.py): microseconds per call of modules on batch 1-2 inputs, eval under no_grad and
training fwd / fwd+bwd, beside torch's modules.

On CUDA (--device cuda) "masknorm" is backend "auto", which is "torch" there too until the Triton
kernels have run on a GPU; every case that calls masked_norm on (x, mask, dims, weight, bias) also
times masknorm with backend="triton" (every family has Triton kernels), layer and RMS norm at 16384
tokens x 4096 in bfloat16 are added, and each implementation's achieved memory bandwidth is
reported: the least traffic of a fused fwd+bwd norm (read x, write y; read dy and x, write dx: 5 x
the bytes of x) over the time (bandwidth_gb_per_s).

Large CPU tensors spend much of their time page-faulting fresh memory; glibc returns big
blocks to the OS (munmap, or trimming the heap) unless MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ are raised. The benchmark re-executes itself with both set (unless
--allocator default) and prints the setting it ran with.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

from masknorm.fast import native
from masknorm_cli.bench_conformer import ConformerBlock
from masknorm.functional import masked_norm
from masknorm.modules import MaskedBatchNorm1d, MaskedGroupNorm, MaskedInstanceNorm1d
from masknorm_cli import parsers
from masknorm_cli.bench_small import print_header, print_small, run_small, small_cases, spread

_ALLOCATOR = parsers.BENCH_ALLOCATOR
NOISY = 0.2  # spread above which the ratios are not worth reading
GOAL = 1.2  # masknorm within 1.2x of torch's unmasked layer


def plain_masked_norm(x, mask, dims, eps, weight, bias):
    """What users write by hand: masked moments by multiplication, autograd for the backward."""
    m = mask.to(x.dtype).expand_as(x)
    k = m.sum(dims, keepdim=True)
    mu = (x * m).sum(dims, keepdim=True) / k
    var = (((x - mu) * m) ** 2).sum(dims, keepdim=True) / k
    return (x - mu) / torch.sqrt(var + eps) * weight + bias


@dataclass
class Case:
    name: str
    x: torch.Tensor
    mask: torch.Tensor
    dims: Sequence[int]
    weight: torch.Tensor
    bias: torch.Tensor
    native_name: str
    native: Callable[[torch.Tensor], torch.Tensor]
    masknorm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # default: masked_norm on the case
    uses_fused_kernel: bool = False  # also time masknorm with the fused CPU kernel off
    plain: bool = True  # also time the plain masked norm on the case's dims, weight and bias
    compiled_too: bool = False  # with --compiled: also time both sides under torch.compile
    triton: bool = True  # on a GPU: also time masked_norm(x, mask, dims, weight, bias, backend="triton")
    center: bool = True  # the masked_norm of the case: layer (True) or RMS norm


def _layer_cases(gen: torch.Generator, device: str, B: int, T: int, D: int, scattered_too: bool,
                 dtype: torch.dtype = torch.float32) -> List[Case]:
    """Layer norm over D of (B, T, D) with ~30% padded tokens: at the ends of the sequences (the
    usual layout) and, if asked, scattered at random."""
    x = torch.randn(B, T, D, generator=gen).to(device, dtype).requires_grad_()
    lengths = T - (torch.rand(B, 1, generator=gen) * 0.6 * T).long()
    masks = [("sequences padded at the end", (torch.arange(T) < lengths).unsqueeze(-1))]
    if scattered_too:
        masks.append(("padded tokens scattered at random", torch.rand(B, T, 1, generator=gen) > 0.3))
    w = torch.ones(D, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
    name = "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
    return [
        Case(f"layer norm B={B} T={T} D={D}{name}, dim=-1, {how} ({_percent(tokens)} padding)", x, tokens.to(device),
             (-1,), w, b, "F.layer_norm", lambda t, w=w, b=b: F.layer_norm(t, (D,), w, b),
             uses_fused_kernel=device == "cpu")
        for how, tokens in masks
    ]


def _cuda_cases(gen: torch.Generator, device: str, scale: float) -> List[Case]:
    """The issue's transformer sizes: layer and RMS norm over 4096 features, 16384 tokens in bfloat16."""
    T = max(1, int(4096 * scale))
    layer = _layer_cases(gen, device, 4, T, 4096, scattered_too=False, dtype=torch.bfloat16)[0]
    return [layer, _rms_case(gen, device, scale, B=4, T=T, D=4096, dtype=torch.bfloat16)]


def _cases(device: str, scale: float) -> List[Case]:
    gen = torch.Generator().manual_seed(0)
    layer = _layer_cases(gen, device, 32, max(1, int(512 * scale)), 768, scattered_too=True)
    small = _layer_cases(gen, device, 8, max(1, int(128 * scale)), 256, scattered_too=False)
    Bb, C, L = 64, 256, max(1, int(1024 * scale))
    xb = torch.randn(Bb, C, L, generator=gen).to(device).requires_grad_()
    rows = (torch.rand(Bb, 1, L, generator=gen) > 0.3).to(device)
    wb = torch.ones(C, 1, device=device, requires_grad=True)
    bb = torch.zeros(C, 1, device=device, requires_grad=True)
    batch = Case(f"batch norm B={Bb} C={C} L={L}, dim=(0,2), (B,1,L) mask, {_percent(rows)} padding at random", xb, rows, (0, 2), wb, bb,
                 "F.batch_norm (train)",
                 lambda t, w=wb, b=bb: F.batch_norm(t, None, None, w.flatten(), b.flatten(), training=True))
    module = MaskedBatchNorm1d(C).to(device)
    torch_module = torch.nn.BatchNorm1d(C).to(device)
    modules = Case(f"MaskedBatchNorm1d({C}) training, running statistics on: as above", xb, rows, (0, 2),
                   module.weight.reshape(C, 1), module.bias.reshape(C, 1), "nn.BatchNorm1d (train)", torch_module,
                   lambda t: module(t, rows.squeeze(1)), compiled_too=True)
    return [*layer, batch, modules, *small, *_time_cases(gen, device, scale), _rms_case(gen, device, scale),
            _elementwise_case(gen, device, scale),
            _layer_cases(gen, device, 8, max(1, int(128 * scale)), 256, scattered_too=False, dtype=torch.bfloat16)[0],
            _conformer_case(gen, device, scale), *(_cuda_cases(gen, device, scale) if device == "cuda" else [])]


def _lengths_mask(gen: torch.Generator, B: int, T: int) -> torch.Tensor:
    """(B, T) validity of sequences padded at the end, lengths 40-100% of T."""
    lengths = T - (torch.rand(B, 1, generator=gen) * 0.6 * T).long()
    return torch.arange(T) < lengths


def _time_cases(gen: torch.Generator, device: str, scale: float) -> List[Case]:
    """Group and instance norm over time, the speech layout: wav2vec2's feature extractor
    (GroupNorm(32, 32) on (8, 32, 1599)), float32 and bfloat16."""
    B, C, L = 8, 32, max(1, int(1599 * scale))
    mask = _lengths_mask(gen, B, L).to(device)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, C, L, generator=gen).to(device, dtype).requires_grad_()
        name = str(dtype).removeprefix("torch.")
        for ours, theirs, label in (
            (MaskedGroupNorm(C, C), torch.nn.GroupNorm(C, C), f"MaskedGroupNorm({C}, {C})"),
            (MaskedInstanceNorm1d(C, affine=True), torch.nn.InstanceNorm1d(C, affine=True),
             f"MaskedInstanceNorm1d({C}, affine=True)"),
        ):
            ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
            out.append(Case(f"{label} B={B} C={C} L={L} {name}, lengths mask ({_percent(mask)} padding)", x,
                            mask.unsqueeze(1), (2,), ours.weight.reshape(C, 1), ours.bias.reshape(C, 1),
                            type(theirs).__name__, theirs, lambda t, m=ours: m(t, mask), uses_fused_kernel=True,
                            plain=dtype == torch.float32, compiled_too=dtype == torch.float32))
    return out


def _rms_case(gen: torch.Generator, device: str, scale: float, B: int = 8, T: int = 0, D: int = 512,
              dtype: torch.dtype = torch.float32) -> Case:
    """RMS norm over D of (B, T, D) (T = 512 * scale by default) with a token mask, against F.rms_norm."""
    T = T or max(1, int(512 * scale))
    x = torch.randn(B, T, D, generator=gen).to(device, dtype).requires_grad_()
    tokens = _lengths_mask(gen, B, T).to(device)
    w = torch.ones(D, device=device, dtype=dtype, requires_grad=True)
    name = "" if dtype == torch.float32 else f" {str(dtype).removeprefix('torch.')}"
    return Case(f"RMS norm B={B} T={T} D={D}{name}, token mask ({_percent(tokens)} padding)", x, tokens.unsqueeze(-1),
                (-1,), w, None, "F.rms_norm", lambda t: F.rms_norm(t, (D,), w, 1e-5),
                lambda t: masked_norm(t, tokens.unsqueeze(-1), -1, center=False, weight=w), plain=False, center=False)


def _elementwise_case(gen: torch.Generator, device: str, scale: float) -> Case:
    """Layer norm over D of (B, T, D) with a mask per element (10% masked out at random), against
    F.layer_norm: the row kernel's layout."""
    B, T, D = 8, max(1, int(512 * scale)), 512
    x = torch.randn(B, T, D, generator=gen).to(device).requires_grad_()
    mask = (torch.rand(B, T, D, generator=gen) > 0.1).to(device)
    w = torch.ones(D, device=device, requires_grad=True)
    b = torch.zeros(D, device=device, requires_grad=True)
    return Case(f"layer norm B={B} T={T} D={D}, elementwise mask ({_percent(mask)} masked out)", x, mask, (-1,), w, b,
                "F.layer_norm", lambda t: F.layer_norm(t, (D,), w, b), uses_fused_kernel=device == "cpu")


def _conformer_case(gen: torch.Generator, device: str, scale: float) -> Case:
    """One conformer block (d=256, 4 heads, kernel 31) on (8, 400, 256), training mode."""
    B, T, d = 8, max(1, int(400 * scale)), 256
    x = torch.randn(B, T, d, generator=gen).to(device).requires_grad_()
    mask = _lengths_mask(gen, B, T).to(device)
    torch.manual_seed(0)
    ours = ConformerBlock(d, masked=True).to(device)
    theirs = ConformerBlock(d, masked=False).to(device)
    theirs.load_state_dict(ours.state_dict())
    return Case(f"conformer block B={B} T={T} d={d} (attention, conv module with batch norm, feed-forward)", x,
                mask, (-1,), None, None, "conformer, torch norms", lambda t: theirs(t, mask),
                lambda t: ours(t, mask), uses_fused_kernel=True, plain=False, compiled_too=True, triton=False)


def _compiled(cases: List[Case]) -> List[Case]:
    """The cases marked compiled_too again, each side under torch.compile."""
    out = []
    for case in cases:
        if not case.compiled_too:
            continue
        out.append(Case(f"torch.compile: {case.name}", case.x, case.mask, case.dims, case.weight, case.bias,
                        f"compiled {case.native_name}", torch.compile(case.native), torch.compile(case.masknorm),
                        plain=False, triton=False))
    return out


def _setting(env: dict) -> str:
    return " ".join(f"{name}={value}" for name, value in env.items())


def _percent(mask: torch.Tensor) -> str:
    return f"{100 * (1 - mask.float().mean().item()):.0f}%"


def _saved_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of distinct storages autograd keeps for backward while fn's output is alive."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _median_ms(samples: List[float]) -> float:
    return 1e3 * statistics.median(samples)


def least_traffic_bytes(x: torch.Tensor) -> int:
    """The bytes any fused fwd+bwd norm of x moves at least: read x, write y (forward); read dy and x,
    write dx (backward): 5 x the bytes of x (the mask, parameters and statistics are small beside it)."""
    return 5 * x.numel() * x.element_size()


def bandwidth_gb_per_s(traffic_bytes: int, ms: float) -> float:
    """Achieved memory bandwidth in GB/s (10^9 bytes per second) of `traffic_bytes` moved in `ms` milliseconds."""
    return traffic_bytes / 1e6 / ms


def run_case(case: Case, repeats: int, warmup: int, clock: Callable[[], float] = time.perf_counter,
             gpu: Optional[bool] = None) -> dict:
    """Interleaved timings (fwd+bwd) of masknorm, the native kernel and the plain masked norm; with
    gpu (default: x is on CUDA) also masknorm on the Triton kernels, and every implementation's
    achieved bandwidth. (gpu on CPU tensors runs the same code under Triton's interpreter: tests.)"""
    gpu = case.x.is_cuda if gpu is None else gpu
    grad = torch.randn_like(case.x)

    def ours():
        return masked_norm(case.x, case.mask, case.dims, weight=case.weight, bias=case.bias)

    masknorm = ours if case.masknorm is None else (lambda: case.masknorm(case.x))

    def ours_without_kernels():
        with native.kernels(False):
            return masknorm()

    def ours_on_triton():
        return masked_norm(case.x, case.mask, case.dims, weight=case.weight, bias=case.bias, center=case.center,
                           backend="triton")

    impls = {
        "masknorm": masknorm,
        **({"masknorm, kernels off": ours_without_kernels} if case.uses_fused_kernel and not case.x.is_cuda else {}),
        **({"masknorm, backend triton": ours_on_triton} if gpu and case.triton else {}),
        case.native_name: lambda: case.native(case.x),
        **({"plain torch (masked)": lambda: plain_masked_norm(case.x, case.mask, case.dims, 1e-5, case.weight,
                                                              case.bias)} if case.plain else {}),
    }
    samples = {name: [] for name in impls}
    sync = torch.cuda.synchronize if case.x.is_cuda else (lambda: None)
    for i in range(warmup + repeats):
        for name, fn in impls.items():
            case.x.grad = None
            sync()
            start = clock()
            fn().backward(grad)
            sync()
            if i >= warmup:
                samples[name].append(clock() - start)
    x_bytes = case.x.numel() * case.x.element_size()
    traffic = least_traffic_bytes(case.x)
    return {
        "median_ms": {name: _median_ms(s) for name, s in samples.items()},
        "spread": {name: spread(s) for name, s in samples.items()},
        "saved_over_x": {name: _saved_bytes(fn) / x_bytes for name, fn in impls.items()},
        "native": case.native_name,
        "gb_per_s": ({name: bandwidth_gb_per_s(traffic, _median_ms(s)) for name, s in samples.items()}
                     if gpu else None),
    }


def _print_case(case: Case, result: dict) -> None:
    native = result["median_ms"][result["native"]]
    print(f"\n{case.name}")
    bandwidth = result.get("gb_per_s")  # on CUDA only
    print(f"  {'implementation':<24} {'median ms':>10} {'spread':>7} {'vs native':>10} {'saved/x':>8}"
          + (f" {'GB/s':>8}" if bandwidth else ""))
    for name, ms in result["median_ms"].items():
        ratio = ms / native
        goal = "  over the 1.2x goal" if name == "masknorm" and ratio > GOAL else ""
        achieved = f" {bandwidth[name]:>8.0f}" if bandwidth else ""
        print(f"  {name:<24} {ms:>10.2f} {100 * result['spread'][name]:>6.0f}% {ratio:>9.2f}x "
              f"{result['saved_over_x'][name]:>7.2f}x{achieved}{goal}")
    noisy = max(result["spread"].values())
    if noisy > NOISY:
        print(f"  WARNING: too noisy to compare: runs of one implementation differ by up to {100 * noisy:.0f}% "
              f"(interquartile range over median; limit {100 * NOISY:.0f}%); the machine is busy: rerun when "
              "it is idle, or with more --repeats")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parsers.bench().parse_args(argv)
    if args.device not in ("cpu", "cuda"):
        print(f"masknorm bench: --device is cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"masknorm bench --device cuda: no CUDA device here (torch {torch.__version__}, built with CUDA "
              f"{torch.version.cuda or 'none'}); run it on a machine with an NVIDIA GPU and a CUDA build of torch",
              file=sys.stderr)
        return 2
    if args.allocator == "tuned" and not _ALLOCATOR.keys() <= os.environ.keys() and args.device == "cpu":
        env = dict(os.environ, **_ALLOCATOR)
        cmd = [sys.executable, "-m", "masknorm_cli.bench", *(sys.argv[1:] if argv is None else argv)]
        return subprocess.call(cmd, env=env)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"masknorm bench: torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"allocator: {_setting({name: os.environ.get(name, 'unset') for name in _ALLOCATOR})}")
    print(native.describe())
    print(f"fwd+bwd (float32 unless named), median of {args.repeats} interleaved runs after {args.warmup} warm-up "
          "runs; spread: interquartile range / median; saved/x: bytes kept for backward / bytes of x;\n"
          "masknorm, kernels off: the fused CPU kernels disabled (float32/float64 padded-token layer norm on "
          "torch's kernels; RMS and bfloat16 token norms, group and instance norm on the general path)")
    cases = _cases(args.device, args.scale)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"clock: {args.clock}")
    for case in cases + (_compiled(cases) if args.compiled else []):
        if args.only in case.name:
            _print_case(case, run_case(case, args.repeats, args.warmup, clock))
    if args.device == "cpu":
        small = [case for case in small_cases() if args.only in case.name]
        if small:
            print_header()
        for case in small:
            print_small(case, run_small(case, args.repeats, args.warmup, clock))
    return 0


if __name__ == "__main__":
    sys.exit(main())
