"""The array frameworks a checked callable may speak, so that it is checked on its own arrays:
torch, numpy, JAX, and Keras 3 (whose tensors are its backend's: torch or JAX).

    to_native(t):          the torch tensor t as the framework's array, value for value (exact)
    to_numpy(a):           the framework's array as float64 numpy (exact: float64 holds every narrower float)
    call(fn, x, m):        fn(x, m) (fn(x) when m is None); JAX: under jax.jit, compiled once per shape
    segmented(fn):         fn(x_nodes, batch) as a function of (x, mask) (torch: graph libraries' convention)
    vjp(fn, x, m, g):      g^T d fn(x, m)/dx by the framework's own autodiff (torch.autograd, jax.vjp); None: no autodiff

The heavy frameworks are imported only when asked for (or detected from what fn returns).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
NAMES = ("torch", "numpy", "jax", "keras")


class Framework:
    """torch: the oracle's own arrays; the other frameworks override the conversions."""

    name = "torch"
    array_type = "torch.Tensor"
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def is_array(self, a: Any) -> bool:
        """a is this framework's array type."""
        return isinstance(a, torch.Tensor)

    def to_native(self, t: torch.Tensor) -> Any:
        """t (a torch tensor) as this framework's array, on a copy."""
        return t.clone()

    def to_numpy(self, a: Any) -> np.ndarray:
        """An array of this framework as float64 (or bool) numpy."""
        a = a.detach().cpu()
        return a.numpy() if a.dtype == torch.bool else a.double().numpy()

    def dtype_name(self, a: Any) -> str:
        """The dtype of an array of this framework, as a plain name ("float32")."""
        return str(a.dtype).removeprefix("torch.")

    shape_buckets = False  # draw every shape: a new shape costs nothing here
    via_keras = False  # set by framework("keras"): the arrays are those of Keras's backend, this one

    def describe(self) -> str:
        """The framework as the report's setup line names it: "torch", "jax (jax.jit)", "keras
        (torch backend)"."""
        detail = self.detail()
        if self.via_keras:
            return f"keras ({self.name} backend{f', {detail}' if detail else ''})"
        return f"{self.name}{f' ({detail})' if detail else ''}"

    def detail(self) -> str:
        """How fn is called, where there is more to it than the framework ("" here)."""
        return ""

    def call(self, fn: Callable[..., Any], x: Any, m: Optional[Any]) -> Any:
        """fn(x, m), or fn(x) when m is None."""
        return fn(x) if m is None else fn(x, m)

    def vjp(self, fn: Callable[..., Any], x: Any, m: Optional[Any], g: Any) -> Optional[Any]:
        """g^T d fn(x, m)/dx by torch.autograd (None when the output does not depend on x)."""
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(self.call(fn, x, m), x, g, allow_unused=True)
        return gx

    def call_code(self, args: str) -> str:
        """The expression that calls fn on `args` in a reproduction, as the check called it."""
        return f"fn({args})"

    def segmented(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """fn(x_nodes, batch) as a function of (x, mask) with mask x's leading axes: x_nodes =
        x[mask], the valid positions in order, batch = their index along axis 0 (a graph
        library's batch vector), and fn's output put back at those positions of x (the rest keep
        x: masked="keep"). Differentiable: the gather and scatter are torch index ops."""

        def composite(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            where = mask.nonzero(as_tuple=True)
            nodes = x[where]
            out = fn(nodes, where[0])
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(nodes.shape):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(f"fn(x_nodes, batch) returned {shape} for x_nodes of shape {tuple(nodes.shape)}")
            return x.index_put(where, out)

        return composite

    def code(self, name: str, values: str, dtype: Optional[str], grad: bool = False) -> str:
        """A line that rebuilds an array of this framework from a Python literal."""
        if dtype is None:
            return f"{name} = torch.tensor({values})"
        return f"{name} = torch.tensor({values}, dtype=torch.{dtype}{', requires_grad=True' if grad else ''})"

    def preamble(self, dtype: str) -> Tuple[str, ...]:
        """The imports (and settings) a reproduction starts with."""
        return ("import torch",)

    def backend_code(self) -> Tuple[str, ...]:
        """Lines a reproduction runs before any import: under Keras, its backend as checked
        (Keras reads KERAS_BACKEND once, when first imported)."""
        if not self.via_keras:
            return ()
        return ("import os", f'os.environ.setdefault("KERAS_BACKEND", "{self.name}")  # the backend Keras was checked on')

    def gradient_code(self, args: str) -> Tuple[str, ...]:
        """Lines that print the gradient of fn(`args`) at x for grad_out."""
        return (f"fn({args}).backward(grad_out)", "print(x.grad)")


class Numpy(Framework):
    """numpy arrays: no autodiff (the gradient properties are skipped), no bfloat16."""

    name = "numpy"
    array_type = "numpy.ndarray"
    dtypes = ("float64", "float32", "float16")

    def is_array(self, a: Any) -> bool:
        return isinstance(a, np.ndarray)

    def to_native(self, t: torch.Tensor) -> Any:
        return t.detach().cpu().numpy().copy()

    def to_numpy(self, a: Any) -> np.ndarray:
        return a if a.dtype == np.bool_ else a.astype(np.float64)

    def dtype_name(self, a: Any) -> str:
        return np.dtype(a.dtype).name

    vjp = None  # type: ignore[assignment]

    def segmented(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise ValueError("segments: only torch callables take fn(x_nodes, batch) here")

    def code(self, name: str, values: str, dtype: Optional[str], grad: bool = False) -> str:
        return f"{name} = np.array({values}{'' if dtype is None else f', dtype=np.{dtype}'})"

    def preamble(self, dtype: str) -> Tuple[str, ...]:
        return ("import numpy as np",)


class Jax(Framework):
    """JAX arrays, gradients by jax.vjp. float64 needs jax_enable_x64, which check() turns on.

    JAX compiles per input shape: op by op, each primitive is compiled once per shape (measured on a
    Flax LayerNorm: 1-3 s per new shape forward, 2-4 s for its VJP, then 0.1 s a call); under
    jax.jit (`jit`, the default, as JAX code usually runs) the whole call is compiled once per shape
    (0.5 s forward, 1 s VJP, then 0.2 ms a call). fn is jitted with x and the mask as arguments;
    when tracing fails (fn needs concrete values) the call runs op by op, counted in `fallbacks`.
    Few shapes are drawn (shape_buckets), since each new shape costs a compilation."""

    name = "jax"
    array_type = "jax.Array"
    shape_buckets = True

    def __init__(self, jit: bool = True) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.jit = jax, jnp, jit
        self.fallbacks = 0
        self._jitted: dict = {}

    def detail(self) -> str:
        how = "jax.jit" if self.jit else "op by op"
        return f"{how}{f', op by op after jax.jit failed on {self.fallbacks} calls' if self.fallbacks else ''}"

    def _pullback(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """(x, g, *m) -> g^T d fn(x, *m)/dx by jax.vjp."""
        jax = self.jax
        return lambda x, g, *m: jax.vjp(lambda x: fn(x, *m), x)[1](g)[0]

    def _compiled(self, fn: Callable[..., Any]) -> Tuple[Callable[..., Any], Callable[..., Any]]:
        """fn and its pullback under jax.jit, made once per fn (JAX then compiles once per shape)."""
        if id(fn) not in self._jitted:
            self._jitted[id(fn)] = (self.jax.jit(fn), self.jax.jit(self._pullback(fn)))
        return self._jitted[id(fn)]

    def _run(self, jitted: Callable[..., Any], eager: Callable[..., Any], *args: Any) -> Any:
        if self.jit:
            try:
                return jitted(*args)
            except Exception:  # noqa: BLE001 - fn cannot be traced: run it op by op, which raises its own error
                self.fallbacks += 1
        return eager(*args)

    def call(self, fn: Callable[..., Any], x: Any, m: Optional[Any]) -> Any:
        args = (x,) if m is None else (x, m)
        return self._run(self._compiled(fn)[0], fn, *args)

    def vjp(self, fn: Callable[..., Any], x: Any, m: Optional[Any], g: Any) -> Optional[Any]:
        return self._run(self._compiled(fn)[1], self._pullback(fn), x, g, *(() if m is None else (m,)))

    def segmented(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        raise ValueError("segments: only torch callables take fn(x_nodes, batch) here")

    def enable(self, dtype: str) -> None:
        """Turn on 64-bit arrays when the check is in float64 (otherwise JAX silently uses float32)."""
        if dtype == "float64":
            self.jax.config.update("jax_enable_x64", True)

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self.jax.Array)

    def to_native(self, t: torch.Tensor) -> Any:
        # cast in numpy (exact: each value fits the dtype) and device_put: jnp.asarray and a cast
        # by JAX compile once per shape
        if t.dtype == torch.bool:
            return self.jax.device_put(t.numpy())
        return self.jax.device_put(t.double().numpy().astype(getattr(self.jnp, str(t.dtype).removeprefix("torch."))))

    def to_numpy(self, a: Any) -> np.ndarray:
        arr = np.asarray(a)
        return arr if arr.dtype == np.bool_ else arr.astype(np.float64)

    def dtype_name(self, a: Any) -> str:
        return str(a.dtype)

    def code(self, name: str, values: str, dtype: Optional[str], grad: bool = False) -> str:
        return f"{name} = jnp.array({values}{'' if dtype is None else f', dtype=jnp.{dtype}'})"

    def preamble(self, dtype: str) -> Tuple[str, ...]:
        lines = ("import jax", "import jax.numpy as jnp")
        return lines + (('jax.config.update("jax_enable_x64", True)',) if dtype == "float64" else ())

    def call_code(self, args: str) -> str:
        return f"jax.jit(fn)({args})" if self.jit else f"fn({args})"

    def gradient_code(self, args: str) -> Tuple[str, ...]:
        vjp = "lambda x, g, *m: jax.vjp(lambda x: fn(x, *m), x)[1](g)[0]"
        call = f"jax.jit({vjp})" if self.jit else f"({vjp})"
        return (f"print({call}(x, grad_out{args.removeprefix('x')}))",)


def keras_backend() -> str:
    """Keras 3's backend, imported on first use: KERAS_BACKEND, else ~/.keras/keras.json; torch when
    neither says (set here before keras is imported, so that Keras does not need TensorFlow)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    return keras.backend.backend()


def framework(name: str, jit: bool = True) -> Framework:
    """The Framework called `name` (one of NAMES); keras is its backend's (torch or jax); `jit`:
    JAX calls under jax.jit (else op by op); a Keras framework says so in describe(). ValueError
    for another name or a Keras backend without autodiff support here."""
    if name == "torch":
        return Framework()
    if name == "numpy":
        return Numpy()
    if name == "jax":
        return Jax(jit)
    if name == "keras":
        backend = keras_backend()
        if backend not in ("torch", "jax"):
            raise ValueError(f"Keras on the {backend} backend is not supported: use KERAS_BACKEND=torch or jax")
        fw = framework(backend, jit)
        fw.via_keras = True
        return fw
    raise ValueError(f"framework must be one of {NAMES}, got {name!r}")


def detect(out: Any) -> Optional[str]:
    """The framework an output belongs to, from its type alone (None when unknown)."""
    if isinstance(out, torch.Tensor):
        return "torch"
    if isinstance(out, np.ndarray):
        return "numpy"
    if type(out).__module__.split(".")[0] in ("jax", "jaxlib"):
        return "jax"
    return None
