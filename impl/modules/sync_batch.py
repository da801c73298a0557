"""Masked batch norm whose statistics span every process of a torch.distributed group.

Training, with an initialized process group of more than one process (any backend, CPU included):

    forward   each process computes per channel (k, mu, sqrt(M2)) of its valid values (float64,
              masknorm.modules._merge.local_moments); ONE all_gather exchanges them, with two header entries
              (the `masked` policy, x's rank); every process merges them by counts
              (merge_moments, Chan et al.) and normalizes its own x with the global statistics
    backward  the closed-form VJP of masked_norm with sum_P g and sum_P g*y_hat all-reduced
              (ONE all_reduce); the weight and bias gradients stay per process (DDP sums them)
    running   from the global masked mean and unbiased global masked variance M2/(k - 1), the same on
              every process; channels with global k <= 1 keep their values

The first synchronized call of a module also all-gathers num_features once, so that processes whose
modules differ raise a ValueError together instead of deadlocking in a collective of unequal sizes.
A process whose input fails its checks (shape, mask convention) still takes part in the all_gather,
with a payload marking it rejected, then raises its own error; the others raise a ValueError naming
its rank. Processes that disagree on `masked` or on x's rank all raise too.

Otherwise (eval, no initialized process group, a group of one process) it is exactly
MaskedBatchNorm: local batch statistics, or the running ones in eval; torch's SyncBatchNorm falls
back to its local batch norm in the same cases.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from masknorm._autograd import GroupStats, affine, as_dtype, compose, compute_dtype, general_vjp, normalized, regions
from masknorm._contract import POLICIES
from masknorm.modules._merge import ACCUMULATE, LocalMoments, MergedMoments, local_moments, merge_moments
from masknorm._stats import exponent_bounds
from masknorm.modules._masks import channel_view, valid_mask
from masknorm.modules._norm_base import bias_kwarg
from masknorm.modules._running import Moments
from masknorm.modules.batch import _MaskedBatchNorm

_HEADER = 2  # masked policy, x.dim()
_REJECTED = -1.0  # header of a process whose input failed its checks


def _gather(payload: torch.Tensor, group: Any) -> torch.Tensor:
    """all_gather of equal-size tensors, stacked on a new axis 0 (the list form: gloo has no
    all_gather_into_tensor)."""
    parts = [torch.empty_like(payload) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, payload, group=group)
    return torch.stack(parts)


def _check_peers(values: torch.Tensor, names: Tuple[str, ...]) -> None:
    """ValueError (on every process alike) unless each column of `values` (world, len(names)) is the
    same on every process."""
    for column, name in enumerate(names):
        seen = values[:, column].tolist()
        if len(set(seen)) > 1:
            shown = ", ".join(f"rank {r}: {POLICIES[int(v)]!r}" if name == "masked" else f"rank {r}: {v:g}"
                              for r, v in enumerate(seen))
            raise ValueError(f"MaskedSyncBatchNorm: {name} differs across the process group ({shown})")


def reject_input(num_features: int, group: Any, device: torch.device) -> None:
    """Take part in the statistics' all_gather with a payload that tells the others this process's input
    was rejected (they raise too, instead of waiting in the collective)."""
    _gather(torch.full((3 * num_features + _HEADER,), _REJECTED, dtype=ACCUMULATE, device=device), group)


def global_moments(x: torch.Tensor, mask: Optional[torch.Tensor], masked: str, group: Any) -> MergedMoments:
    """Per channel, the moments of the valid values of x over every process of `group` (one all_gather)."""
    dims = [0] + list(range(2, x.dim()))
    local = local_moments(x, mask, dims)
    header = torch.tensor([POLICIES.index(masked), x.dim()], dtype=ACCUMULATE, device=x.device)
    payload = torch.cat([torch.stack([t.reshape(-1) for t in local]).reshape(-1), header])
    gathered = _gather(payload, group)
    rejected = (gathered[:, -1] == _REJECTED).nonzero().reshape(-1).tolist()
    if rejected:
        raise ValueError(f"MaskedSyncBatchNorm: the input of rank(s) {rejected} of the process group failed its "
                         "checks (their error says why); every process of the group stops here")
    _check_peers(gathered[:, -_HEADER:], ("masked", "input dimension"))
    per_rank = gathered[:, :-_HEADER].reshape(gathered.shape[0], 3, *local.count.shape)
    return merge_moments(LocalMoments(*per_rank.unbind(1)))


def group_stats_from(m: MergedMoments, dtype: torch.dtype, eps: float) -> GroupStats:
    """masknorm's GroupStats (degenerate and constant groups as in masknorm._stats.group_stats) from
    merged moments, in `dtype`: biased variance M2/k, scale a = 1/inv_scale kept within dtype's range."""
    lo, hi = exponent_bounds(dtype, eps)
    inv_a = torch.exp2(-torch.round(-torch.log2(m.inv_scale)).clamp(lo, hi))  # 1/inv_scale's exponent, clamped
    ratio = inv_a / m.inv_scale
    k = m.count
    constant = m.m2_scaled == 0
    degenerate = (k <= 0) | (constant if eps == 0 else torch.zeros_like(constant))
    var_s = torch.where(degenerate | constant, 1.0, m.m2_scaled / k.clamp(min=1) * ratio * ratio)
    inv_s_s = torch.rsqrt(var_s + eps * inv_a * inv_a)
    inv_s = torch.where(constant & ~degenerate, eps**-0.5 if eps > 0 else 0.0, inv_s_s * inv_a)
    fields = (
        torch.where(constant, 1.0, inv_a),
        torch.where(constant, m.mean, m.mean * inv_a),
        torch.where(constant, inv_s, inv_s_s),
        inv_s,
        k,
        k,
    )
    return GroupStats(*(f.to(dtype) for f in fields), degenerate)


class SyncMaskedNormFunction(torch.autograd.Function):
    """out = masked batch norm of x with the given (global) statistics; backward all-reduces the sums."""

    @staticmethod
    def forward(ctx, x, mask, weight, bias, eps, masked, group, *stats):
        st = GroupStats(*stats)
        ct = compute_dtype(x.dtype)
        xc = x.to(ct)
        P, passthrough = regions(mask, st.degenerate, masked)
        w = None if weight is None else weight.to(ct)
        b = None if bias is None else bias.to(ct)
        out = compose(affine(normalized(xc, st), w, b), xc, P, passthrough, masked)
        ctx.save_for_backward(x, mask, weight, *stats)
        ctx.config = (eps, masked, group, None if bias is None else (bias.shape, bias.dtype))
        return as_dtype(out, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, mask, weight, *stats = ctx.saved_tensors
        eps, masked, group, bias_shape = ctx.config
        dims = tuple([0] + list(range(2, x.dim())))
        needs = (ctx.needs_input_grad[0], False, ctx.needs_input_grad[2], ctx.needs_input_grad[3])
        gx, gw, gb = general_vjp(grad_out, x, mask, weight, bias_shape, (dims, 0, eps, True, masked), needs,
                                 GroupStats(*stats), lambda a, b: _all_reduce_pair(a, b, group))
        return (gx, None, gw, gb, None, None, None) + (None,) * len(stats)


def _all_reduce_pair(a: torch.Tensor, b: torch.Tensor, group: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum over processes of a, of b): one all_reduce of both."""
    both = torch.stack([a, b])
    dist.all_reduce(both, group=group)
    return both[0], both[1]


class MaskedSyncBatchNorm(_MaskedBatchNorm):
    """Masked nn.SyncBatchNorm: x (B, C, *spatial) with mask (B, *spatial) or (B, 1, *spatial)
    (x (B, C) with mask (B,)), statistics over the valid positions of every process in the group.

    Per channel c, over the valid positions V of all processes (k = |V|):
        y = gamma_c (x - mu_c) / sqrt(var_c + eps) + beta_c,   mu_c = (1/k) sum_V x,
        var_c = (1/k) sum_V (x - mu_c)^2,  running_var moves towards (1/(k - 1)) sum_V (x - mu_c)^2
    combined by valid counts (Chan et al.), never as an average of per-process means.
    `masked` ("normalize", "keep", "zero") and a channel with no valid position anywhere (passthrough)
    as in MaskedBatchNorm. Out of training, without an initialized process group, or in a group of
    one process it is MaskedBatchNorm (torch's SyncBatchNorm also falls back to local batch norm).
    Every process of the group must call forward and backward the same number of times.
    """

    _input_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None, *, bias: bool = True, masked: str = "normalize") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                         masked=masked)
        self.process_group = process_group
        self._checked_group: Optional[int] = None  # id() of the group checked: a module stays deep-copyable

    def _sync_group(self) -> Any:
        """The process group to synchronize over, or None when this call runs as MaskedBatchNorm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _check_group(self, group: Any, device: torch.device) -> None:
        """Once per group: every process's num_features, gathered (fixed size, so no hang)."""
        if self._checked_group == id(group):
            return
        mine = torch.tensor([[float(self.num_features)]], dtype=ACCUMULATE, device=device)
        _check_peers(_gather(mine, group)[:, 0], ("num_features",))
        self._checked_group = id(group)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = valid_mask(mask, padding_mask)
        group = self._sync_group()
        if group is None:
            return super().forward(x, mask)
        device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        self._check_group(group, device)
        try:
            if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
                kind = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
                raise TypeError(f"x must be a floating tensor, got {kind}")
            self._check_input_dim(x)
            mask = self._prepare(x, mask)
        except Exception:
            reject_input(self.num_features, group, device)
            raise
        moments = global_moments(x, mask, self.masked, group)
        if self.track_running_stats and self.running_mean is not None:
            ratio = 1.0 / moments.inv_scale
            var = moments.m2_scaled / (moments.count - 1).clamp(min=1) * ratio * ratio
            self._track(Moments(moments.mean, var, moments.count))
        st = group_stats_from(moments, compute_dtype(x.dtype), self.eps)
        trailing = x.dim() - 2
        weight = channel_view(self.weight, (self.num_features,), trailing)
        bias = channel_view(self.bias, (self.num_features,), trailing)
        return SyncMaskedNormFunction.apply(x, mask, weight, bias, self.eps, self.masked, group, *st)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """`module` with every batch norm (nn.BatchNorm*d, nn.SyncBatchNorm, masknorm's MaskedBatchNorm*d
        and MaskedSyncBatchNorm) replaced by a MaskedSyncBatchNorm sharing its parameters and buffers
        (state_dict keys unchanged; `masked` kept from masknorm modules, "normalize" otherwise); a batch
        norm passed itself is returned replaced, as torch's convert_sync_batchnorm does."""
        out = module
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, _MaskedBatchNorm)):
            out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group, masked=getattr(module, "masked", "normalize"),
                      **bias_kwarg(module.bias is not None or not module.affine))
            if module.affine:
                out.weight = module.weight
                out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
