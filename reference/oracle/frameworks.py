"""The array frameworks a checked callable may speak, so that it is checked on its own arrays:
torch, numpy, JAX, and Keras 3 (whose tensors are its backend's: torch or JAX).

    to_native(t): the torch tensor t as the framework's array, value for value (exact)
    to_numpy(a):  the framework's array as float64 numpy (exact: float64 holds every narrower float)
    vjp(f, x, g): g^T df/dx by the framework's own autodiff (torch.autograd, jax.vjp); None: no autodiff

The heavy frameworks are imported only when asked for (or detected from what fn returns).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from masknorm_cli.parsers import CHECK_FRAMEWORKS as NAMES  # one definition, torch-free for --help


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

    def vjp(self, f: Callable[[Any], Any], x: Any, g: Any) -> Optional[Any]:
        """g^T df/dx at x by torch.autograd (None when the output does not depend on x)."""
        x = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(f(x), x, g, allow_unused=True)
        return gx

    def code(self, name: str, values: str, dtype: Optional[str], grad: bool = False) -> str:
        """A line that rebuilds an array of this framework from a Python literal."""
        if dtype is None:
            return f"{name} = torch.tensor({values})"
        return f"{name} = torch.tensor({values}, dtype=torch.{dtype}{', requires_grad=True' if grad else ''})"

    def preamble(self, dtype: str) -> Tuple[str, ...]:
        """The imports (and settings) a reproduction starts with."""
        return ("import torch",)

    def gradient_code(self, call: str) -> Tuple[str, ...]:
        """Lines that print the gradient of `call` (an expression in x) at x for grad_out."""
        return (f"{call}.backward(grad_out)", "print(x.grad)")


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

    def code(self, name: str, values: str, dtype: Optional[str], grad: bool = False) -> str:
        return f"{name} = np.array({values}{'' if dtype is None else f', dtype=np.{dtype}'})"

    def preamble(self, dtype: str) -> Tuple[str, ...]:
        return ("import numpy as np",)


class Jax(Framework):
    """JAX arrays, gradients by jax.vjp. float64 needs jax_enable_x64, which check() turns on."""

    name = "jax"
    array_type = "jax.Array"

    def __init__(self) -> None:
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp

    def enable(self, dtype: str) -> None:
        """Turn on 64-bit arrays when the check is in float64 (otherwise JAX silently uses float32)."""
        if dtype == "float64":
            self.jax.config.update("jax_enable_x64", True)

    def is_array(self, a: Any) -> bool:
        return isinstance(a, self.jax.Array)

    def to_native(self, t: torch.Tensor) -> Any:
        if t.dtype == torch.bool:
            return self.jnp.asarray(t.numpy())
        dtype = getattr(self.jnp, str(t.dtype).removeprefix("torch."))
        return self.jnp.asarray(t.double().numpy(), dtype=dtype)  # exact: each value fits the dtype

    def to_numpy(self, a: Any) -> np.ndarray:
        arr = np.asarray(a)
        return arr if arr.dtype == np.bool_ else arr.astype(np.float64)

    def dtype_name(self, a: Any) -> str:
        return str(a.dtype)

    def vjp(self, f: Callable[[Any], Any], x: Any, g: Any) -> Optional[Any]:
        _, pull = self.jax.vjp(f, x)
        (gx,) = pull(g)
        return gx

    def code(self, name: str, values: str, dtype: Optional[str], grad: bool = False) -> str:
        return f"{name} = jnp.array({values}{'' if dtype is None else f', dtype=jnp.{dtype}'})"

    def preamble(self, dtype: str) -> Tuple[str, ...]:
        lines = ("import jax", "import jax.numpy as jnp")
        return lines + (('jax.config.update("jax_enable_x64", True)',) if dtype == "float64" else ())

    def gradient_code(self, call: str) -> Tuple[str, ...]:
        return (f"_, pull = jax.vjp(lambda x: {call}, x)", "print(pull(grad_out)[0])")


def keras_backend() -> str:
    """Keras 3's backend, imported on first use: KERAS_BACKEND, else ~/.keras/keras.json; torch when
    neither says (set here before keras is imported, so that Keras does not need TensorFlow)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    return keras.backend.backend()


def framework(name: str) -> Framework:
    """The Framework called `name` (one of NAMES); keras is its backend's (torch or jax).
    ValueError for another name or a Keras backend without autodiff support here."""
    if name == "torch":
        return Framework()
    if name == "numpy":
        return Numpy()
    if name == "jax":
        return Jax()
    if name == "keras":
        backend = keras_backend()
        if backend not in ("torch", "jax"):
            raise ValueError(f"Keras on the {backend} backend is not supported: use KERAS_BACKEND=torch or jax")
        return framework(backend)
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
