"""Small layers: RMSNorm, the causal depthwise conv1d, and the official initialisers.

Every parameter carries logical axis names (see `sharding.py`) with eager sharding off, so the
modules build anywhere and the training code decides the mesh placement.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def partitioned(init, names):
    """An initializer whose Param records logical axis `names`; placement is decided later."""
    return nnx.with_partitioning(init, names, eager_sharding=False)


def logical_param(value, names):
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def torch_linear_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for nn.Linear and nn.Conv1d weights."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scaled(init, scale: float):
    def wrapped(key, shape, dtype=jnp.float32):
        return init(key, shape, dtype) * scale

    return wrapped


def inverse_softplus(x):
    # softplus(y) = x  <=>  y = x + log(1 - exp(-x)); expm1 keeps it accurate for small x.
    return x + jnp.log(-jnp.expm1(-x))


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.weight = logical_param(jnp.ones((dim,), param_dtype), ("embed",))

    def __call__(self, x):
        """x: (..., d) -> (..., d) in self.dtype."""
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * inv * self.weight[...].astype(jnp.float32)).astype(self.dtype)


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution over time, channels-last.

    kernel: (w, e), bias: (e,). out_t = sum_k kernel[k] * x[t - (w - 1) + k] + bias, with x = 0
    before the sequence start (or the cached previous inputs when decoding).
    """

    def __init__(self, channels: int, width: int, *, use_bias=True, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):  # fmt: skip
        self.width = width
        self.dtype = dtype
        init = torch_linear_init(width)  # PyTorch's fan_in for a depthwise conv is 1 * width
        self.kernel = logical_param(
            init(rngs.params(), (width, channels), param_dtype), ("conv", "inner")
        )
        self.bias = (
            logical_param(init(rngs.params(), (channels,), param_dtype), ("inner",))
            if use_bias
            else None
        )

    def __call__(self, x, state=None):
        """x: (b, l, e); state: (b, w - 1, e) previous inputs or None.

        Returns (out (b, l, e), new state (b, w - 1, e): the last w - 1 inputs)."""
        bsz, length, e = x.shape
        if state is None:
            state = jnp.zeros((bsz, self.width - 1, e), x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # (b, l + w - 1, e)
        kernel = self.kernel[...].astype(self.dtype)
        out = sum(xp[:, k : k + length] * kernel[k] for k in range(self.width))  # (b, l, e)
        if self.bias is not None:
            out = out + self.bias[...].astype(self.dtype)
        return out.astype(self.dtype), xp[:, xp.shape[1] - (self.width - 1) :]

    def step(self, x, state):
        """x: (b, e); state: (b, w - 1, e). Returns (out (b, e), new state)."""
        window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # (b, w, e)
        out = jnp.einsum("bwe,we->be", window, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            out = out + self.bias[...].astype(self.dtype)
        return out.astype(self.dtype), window[:, 1:]
