"""The group and instance norm modules' lane: one call of the masked-positions kernel from the module.

A module that normalizes x (B, C, *S) per sample over `lead` = (G, C/G) (group norm) or (C,)
(instance norm) hands its call here before masked_norm; where the lane takes it, the output is

    masked_channels_norm(x, mask, weight, bias, G')  =  masked_positions_norm(x as (B, G', C/G', L),
                                                          mask as (B, L), weight, bias) viewed as x

where masked_norm's route would run masked_positions_norm on (B, *lead, *S) split as (B, G', C/G', L):
the same kernel on the same values, the same bits. The route is worked out once per signature
(shapes, dtype, eps, which of mask/weight/bias are given) and kept; a call the route would not send
to that kernel, or one the lane cannot check cheaply, is declined (None) and takes the route, which
checks it and raises as before; so is a call whose groups the kernel flags (the route redoes them).
Where a gradient is wanted, the operator's Autograd kernel (kernels/masked_channels.cpp) records a node
whose backward is the route's fused one (masked_positions_norm_backward on the same views); where that
cannot answer (double backward, traced inputs, flagged groups) it calls _python_backward: the route's
general closed form on the route's views.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from masknorm._autograd import compute_dtype, general_vjp
from masknorm._contract import FLOATING, check_args
from masknorm._tracing import lanes_may_run
from masknorm.fast import dispatch, masked_positions, native
from masknorm.fast.group_views import shape_of


def eager_call(x: torch.Tensor, mask: Optional[torch.Tensor], lead: Tuple[int, ...], eps: object,
               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], masked: object) -> Optional[torch.Tensor]:
    """masked_norm(x.reshape(B, *lead, *S), the mask as (B, 1, ..., *S), axes 2 on, weight and bias as
    (*lead, 1, ...), ...).reshape(x.shape) as one kernel call, bit for bit, for weight and bias of C values that
    the caller has checked: the C++ lane (kernels/lanes.cpp's masked_channels) with the signature's groups.
    None where the lane does not take the call: not eager mode on CPU data of a floating dtype, forward-mode
    AD, a mask other than None or a bool (B, *S) or (B, 1, *S) tensor, weight or bias
    not of x's dtype and device, eps not a float >= 0, or a group the kernel flags."""
    if not lanes_may_run():  # first: a tracer must not follow native.lanes() into a first build and its lock
        return None
    lanes = native.lanes()
    policy = masked_positions.POLICY.get(masked) if type(masked) is str else None
    if not (lanes is not None and policy is not None and type(x) is torch.Tensor and type(eps) is float
            and (mask is None or type(mask) is torch.Tensor)):
        return None
    key = (x.shape, x.dtype, lead, eps, None if mask is None else mask.shape, weight is None, bias is None)
    groups = _GROUPS.get(key, _UNSEEN)
    if groups is _UNSEEN:
        if len(_GROUPS) >= _MAX_SIGNATURES:
            _GROUPS.clear()
        groups = _GROUPS[key] = _groups(*key)
    if groups is None:
        return None
    return lanes.masked_channels(x, mask, weight, bias, groups, eps, policy)


_MAX_SIGNATURES = 256
_UNSEEN = object()
_GROUPS: Dict[tuple, Optional[int]] = {}  # signature -> the kernel's groups G', or None: the lane declines


def _groups(shape: torch.Size, dtype: torch.dtype, lead: Tuple[int, ...], eps: float, mask_shape: Optional[torch.Size],
            no_weight: bool, no_bias: bool) -> Optional[int]:
    """The groups G' of the (B, G', C/G', L) split where masked_norm's route sends a signature's calls to the
    masked-positions kernel (routed on stand-ins of the right shapes and dtypes: the route reads no data),
    else None."""
    spatial = tuple(shape[2:])
    takes_mask = mask_shape is None or tuple(mask_shape) in ((shape[0], *spatial), (shape[0], 1, *spatial))
    if not (dtype in FLOATING and 0.0 <= eps < math.inf and spatial and math.prod(shape) > 0
            and math.prod(lead) == shape[1] and takes_mask):  # the operator reads x as (B, C, *S), S not empty
        return None
    grouped = (shape[0], *lead, *spatial)
    ones = (1,) * len(spatial)
    masks = None if mask_shape is None else (shape[0], *(1,) * len(lead), *spatial)
    params = (*lead, *ones)
    x, mask, weight, bias = (None if s is None else torch.empty((), dtype=t).expand(s) for s, t in (
        (grouped, dtype), (masks, torch.bool), (None if no_weight else params, dtype), (None if no_bias else params, dtype)))
    args = check_args(grouped, masks, tuple(range(2, len(grouped))), eps=eps,
                      weight_shape=shape_of(weight), bias_shape=shape_of(bias))
    route = dispatch.route(x, mask, weight, bias, args)
    if route is None or route.path != dispatch.MASKED_POSITIONS or type(route.layout) is not masked_positions.Layout:
        return None
    B, G, Cg, L = route.layout.sizes()
    if (B, G * Cg) != tuple(shape[:2]) or any(route.layout.channels(t) is not t for t in (weight, bias)):
        return None
    return G


def _python_backward(dy: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                     groups: int, eps: float, policy: int,
                     bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """masked_channels_norm's backward where its autograd node cannot use the fused one: general_vjp (the general
    closed form in differentiable torch ops, as masked_norm's route runs it there) on the route's views, x as
    (B, *lead, *S) with lead = (C,) where the groups are the channels (instance norm), else (G, C/G), the mask as
    (B, 1, ..., *S) and weight as (*lead, 1, ...); grad x in x's shape, grad weight (weight's dtype) and grad bias
    (the computation type) as (C,) vectors, empty where there is no such parameter."""
    B, C, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    lead = (C,) if groups == C else (groups, C // groups)
    ones = (1,) * len(spatial)
    grouped = (B, *lead, *spatial)
    m = None if mask is None else mask.reshape(B, *(1,) * len(lead), *spatial)
    w = None if weight is None else weight.reshape(*lead, *ones)
    bias_shape = ((*lead, *ones), compute_dtype(x.dtype)) if bias else None
    config = (tuple(range(2, len(grouped))), 0, eps, True, _POLICY_NAMES[policy])
    gx, gw, gb = general_vjp(dy.reshape(grouped), x.reshape(grouped), m, w, bias_shape, config,
                             (True, False, w is not None, bias))
    return gx.reshape(x.shape), *(x.new_empty(0) if g is None else g.reshape(-1) for g in (gw, gb))


_POLICY_NAMES = {code: name for name, code in masked_positions.POLICY.items()}
_LIBRARY = torch.library.Library("masknorm", "FRAGMENT")
_LIBRARY.define("masked_channels_python_backward(Tensor dy, Tensor x, Tensor? mask, Tensor? weight, int groups, "
                "float eps, int policy, bool bias) -> (Tensor, Tensor, Tensor)")
_LIBRARY.impl("masked_channels_python_backward", _python_backward, "CompositeImplicitAutograd")
