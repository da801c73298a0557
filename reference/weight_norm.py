"""WeightNorm evaluated in mpmath on the exact input values, each result rounded once to float64.

Per output row (the slices along `dim`; the whole tensor when dim is None), with m = mask (the entries
that take part; None = all) and one scale g:

    r = sqrt(sum_i m_i v_i^2),  u = v / r,  w = g m u;   zero row (r = 0): w = 0 and every derivative 0

The VJP (grad_v, grad_g) and JVP are the spec's generated closed forms
(`masknorm.spec.weight_norm_forms`) on mpf values. Masked-out entries of v and of grad_w are never
read, so whatever they hold (NaN, Inf) changes nothing. `weight_norm_errors` measures a candidate
against these in units of u.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import mpmath
import numpy as np

from masknorm.spec import weight_norm_forms as wf

from .convert import bool_array, float_array, object_array, to_float64, to_mpf
from .error import unit_roundoff
from .oracle.compare import normwise_error
from .problem import check_dps

ZERO = mpmath.mpf(0)


@dataclass(frozen=True)
class Rows:
    """A validated call as rows: v (rows, n) and the like-v arrays as float arrays, g as (rows,),
    mask (rows, n) bool; `back` restores v's shape, `g_shape` is g's."""

    v: np.ndarray
    g: np.ndarray
    mask: np.ndarray
    shape: Tuple[int, ...]
    dim: Optional[int]
    g_shape: Tuple[int, ...]

    def to_rows(self, a: np.ndarray) -> np.ndarray:
        """An array of v's shape as (rows, n)."""
        return _to_rows(a, self.dim)

    def back(self, a: np.ndarray) -> np.ndarray:
        """Inverse of to_rows."""
        if self.dim is None:
            return a.reshape(self.shape)
        moved_shape = (self.shape[self.dim],) + tuple(s for d, s in enumerate(self.shape) if d != self.dim)
        return np.moveaxis(a.reshape(moved_shape), 0, self.dim)


def _rows(v: Any, g: Any, mask: Any, dim: Any) -> Rows:
    """Check the arguments (TypeError/ValueError naming them) and lay them out as rows."""
    va = float_array(v, "v")
    if va.ndim == 0 or va.size == 0:
        raise ValueError(f"v must have at least one dimension and one element, got shape {va.shape}")
    if dim is not None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)):
            raise TypeError(f"dim must be an int or None, got {type(dim).__name__} {dim!r}")
        if not -va.ndim <= dim < va.ndim:
            raise ValueError(f"dim must be in [{-va.ndim}, {va.ndim}) for v of shape {va.shape}, got {dim}")
        dim = int(dim) % va.ndim
    rows = 1 if dim is None else va.shape[dim]
    ga = float_array(g, "g")
    if ga.size != rows or (ga.ndim > 1 and ga.shape != _keepdim(va.shape, dim)):
        raise ValueError(f"g must have {rows} element(s), shape ({rows},) or {_keepdim(va.shape, dim)} "
                         f"for v of shape {va.shape} and dim={dim}, got shape {ga.shape}")
    if mask is None:
        ma = np.ones(va.shape, bool)
    else:
        ma = bool_array(mask, "mask")
        try:
            ma = np.broadcast_to(ma, va.shape)
        except ValueError:
            raise ValueError(f"mask of shape {ma.shape} does not broadcast to v's shape {va.shape}") from None
    return Rows(_to_rows(va, dim), ga.reshape(rows), _to_rows(ma, dim), va.shape, dim, ga.shape)


def _to_rows(a: np.ndarray, dim: Optional[int]) -> np.ndarray:
    moved = a.reshape(1, -1) if dim is None else np.moveaxis(a, dim, 0)
    return moved.reshape(moved.shape[0], -1)


def _keepdim(shape: Tuple[int, ...], dim: Optional[int]) -> Tuple[int, ...]:
    return tuple(1 for _ in shape) if dim is None else tuple(s if d == dim else 1 for d, s in enumerate(shape))


def _like_v(a: Any, name: str, rows: Rows) -> np.ndarray:
    arr = float_array(a, name)
    if arr.shape != rows.shape:
        raise ValueError(f"{name} must have v's shape {rows.shape}, got {arr.shape}")
    return rows.to_rows(arr)


def _direction(v: List[Any], m: np.ndarray) -> Tuple[Optional[mpmath.mpf], List[Any]]:
    """(inv_r, u) of one row; (None, zeros) for a zero row. Masked-out entries are never read."""
    r2 = mpmath.fsum(v[q] ** 2 for q in range(len(v)) if m[q])
    if r2 == 0:
        return None, [ZERO] * len(v)
    inv_r = 1 / mpmath.sqrt(r2)
    return inv_r, [v[q] * inv_r if m[q] else ZERO for q in range(len(v))]


def weight_norm(v: Any, g: Any, mask: Any = None, dim: Optional[int] = 0, *, dps: int = 50) -> np.ndarray:
    """w = g m v / ||m v|| per row (0 on a zero row), in v's shape, rounded once to float64."""
    rows = _rows(v, g, mask, dim)
    with mpmath.workdps(check_dps(dps)):
        vm, gm = to_mpf(rows.v), to_mpf(rows.g)
        out = []
        for row, m, scale in zip(vm, rows.mask, gm):
            _, u = _direction(list(row), m)
            out += [scale * u[q] if m[q] else ZERO for q in range(len(u))]
        return to_float64(rows.back(object_array(out, rows.v.shape)))


def weight_norm_vjp(grad_w: Any, v: Any, g: Any, mask: Any = None, dim: Optional[int] = 0, *,
                    dps: int = 50) -> Tuple[np.ndarray, np.ndarray]:
    """(grad_v in v's shape, grad_g in g's shape) of sum grad_w * w, rounded once to float64:
    grad_v_j = g inv_r m_j (gw_j - u_j sum_m_gw_u), grad_g = sum_m_gw_u; 0 on a zero row."""
    rows = _rows(v, g, mask, dim)
    gw_rows = _like_v(grad_w, "grad_w", rows)
    with mpmath.workdps(check_dps(dps)):
        vm, gm, gwm = to_mpf(rows.v), to_mpf(rows.g), to_mpf(gw_rows)
        grad_v, grad_g = [], []
        for row, m, scale, gw in zip(vm, rows.mask, gm, gwm):
            inv_r, u = _direction(list(row), m)
            if inv_r is None:
                grad_v += [ZERO] * len(u)
                grad_g.append(ZERO)
                continue
            total = mpmath.fsum(gw[q] * u[q] for q in range(len(u)) if m[q])
            grad_g.append(wf.weight_norm_vjp_g(total))
            grad_v += [wf.weight_norm_vjp_v(gw[q], 1, u[q], total, scale, inv_r) if m[q] else ZERO
                       for q in range(len(u))]
        gv = to_float64(rows.back(object_array(grad_v, rows.v.shape)))
        return gv, to_float64(object_array(grad_g, (len(grad_g),))).reshape(rows.g_shape)


def weight_norm_jvp(v: Any, g: Any, v_dot: Any, g_dot: Any = None, mask: Any = None, dim: Optional[int] = 0, *,
                    dps: int = 50) -> np.ndarray:
    """w_dot along (v_dot, g_dot) (g_dot None = 0), in v's shape, rounded once to float64:
    w_dot_p = g inv_r m_p (vdot_p - u_p sum_m_u_vdot) + gdot m_p u_p; 0 on a zero row."""
    rows = _rows(v, g, mask, dim)
    vd_rows = _like_v(v_dot, "v_dot", rows)
    gd = np.zeros(rows.g.shape) if g_dot is None else _rows(v, g_dot, mask, dim).g
    with mpmath.workdps(check_dps(dps)):
        vm, gm, vdm, gdm = to_mpf(rows.v), to_mpf(rows.g), to_mpf(vd_rows), to_mpf(gd)
        out = []
        for row, m, scale, vd, scale_dot in zip(vm, rows.mask, gm, vdm, gdm):
            inv_r, u = _direction(list(row), m)
            if inv_r is None:
                out += [ZERO] * len(u)
                continue
            total = mpmath.fsum(u[q] * vd[q] for q in range(len(u)) if m[q])
            out += [wf.weight_norm_jvp(vd[q], 1, u[q], total, scale, scale_dot, inv_r) if m[q] else ZERO
                    for q in range(len(u))]
        return to_float64(rows.back(object_array(out, rows.v.shape)))


def weight_norm_errors(w: Any, grad_v: Any, grad_g: Any, v: Any, g: Any, grad_w: Any, mask: Any = None,
                       dim: Optional[int] = 0, *, dtype: Any) -> Tuple[float, float]:
    """(forward, gradient) errors of a candidate WeightNorm in units of u of `dtype`, worst over rows:

        forward:  max|w - w*| / (u |g|)                       (||u|| = 1, so |g| bounds the row)
        gradient: max of max|grad_v - grad_v*| / (u |g| ||gw||_2 / r) and |grad_g - grad_g*| / (u ||gw||_2)

    (|g| ||gw|| / r and ||gw|| bound the closed forms' terms: grad_v* itself may be small by
    cancellation.) Equal values (NaN with NaN, the same infinity) are no error; a NaN or infinity on
    one side only, or an error where the scale is 0 (zero rows), is inf. Masked-out entries of grad_w
    do not enter the scales."""
    rows = _rows(v, g, mask, dim)
    u = unit_roundoff(dtype)
    w_ref = weight_norm(v, g, mask, dim)
    gv_ref, gg_ref = weight_norm_vjp(grad_w, v, g, mask, dim)
    gw = np.where(rows.mask, _like_v(grad_w, "grad_w", rows), 0.0)
    gw_norm = np.sqrt((gw * gw).sum(1, keepdims=True))
    with mpmath.workdps(check_dps(50)):
        inv_r = [_direction(list(row), m)[0] or ZERO for row, m in zip(to_mpf(rows.v), rows.mask)]
    v_scale = np.abs(rows.g)[:, None] * gw_norm * to_float64(object_array(inv_r, (len(inv_r), 1)))
    forward = normwise_error(rows.to_rows(float_array(w, "w")), rows.to_rows(w_ref),
                             np.abs(rows.g)[:, None] * np.ones(rows.v.shape), u, (1,))
    grad_v_error = normwise_error(rows.to_rows(float_array(grad_v, "grad_v")), rows.to_rows(gv_ref),
                                  v_scale * np.ones(rows.v.shape), u, (1,))
    grad_g_error = normwise_error(float_array(grad_g, "grad_g").reshape(-1, 1), gg_ref.reshape(-1, 1), gw_norm, u, (1,))
    return forward, max(grad_v_error, grad_g_error)
