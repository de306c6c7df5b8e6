"""Small layers: RMSNorm, the causal depthwise conv1d, and the official initialisers.

Every parameter carries logical axis names (see `sharding.py`) with eager sharding off, so the
modules build anywhere and the training code decides the mesh placement.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.config import CONV_IMPLS
from mamba_jax.scan_sharding import sharded_causal_conv


def resolve_conv_impl(impl: str, width: int, dtype) -> bool:
    """Whether the conv + SiLU runs as the Pallas kernel: impl "pallas" (ValueError where the
    kernel cannot run here), "xla", or "auto" (the kernel where it runs)."""
    if impl == "xla":
        return False
    from pallas_kernels.causal_conv import conv_unsupported_reason

    reason = conv_unsupported_reason(width=width, dtype=dtype)
    if impl == "pallas" and reason is not None:
        raise ValueError(f"conv impl='pallas' is not supported here: {reason}")
    return reason is None


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


def _rms_inv(x32, eps):
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # (..., 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm(x, weight, eps, out_dtype):
    """x / sqrt(mean(x^2) + eps) * weight in fp32, cast to out_dtype. x: (..., d); weight: (d,).

    The VJP keeps only x and the inverse RMS (..., 1) and recomputes the rest: the backward of
    the plain expression would keep fp32 intermediates of x's size."""
    x32 = x.astype(jnp.float32)
    return (x32 * _rms_inv(x32, eps) * weight.astype(jnp.float32)).astype(out_dtype)


def _rms_norm_fwd(x, weight, eps, out_dtype):
    inv = _rms_inv(x.astype(jnp.float32), eps)
    y = (x.astype(jnp.float32) * inv * weight.astype(jnp.float32)).astype(out_dtype)
    return y, (x, weight, inv)


def _rms_norm_bwd(eps, out_dtype, res, g):
    x, weight, inv = res
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    xhat = x32 * inv  # (..., d)
    gw = g32 * weight.astype(jnp.float32)
    # d/dx of x * inv: inv * (g - xhat * mean(g * xhat)), with g the cotangent of xhat.
    dx = inv * (gw - xhat * jnp.mean(gw * xhat, axis=-1, keepdims=True))
    dweight = jnp.sum(g32 * xhat, axis=tuple(range(x.ndim - 1)))  # keeps a split l axis local
    return dx.astype(x.dtype), dweight.astype(weight.dtype)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.weight = logical_param(jnp.ones((dim,), param_dtype), ("embed",))

    def __call__(self, x):
        """x: (..., d) -> (..., d) in self.dtype."""
        return rms_norm(x, self.weight[...], self.eps, jnp.dtype(self.dtype))


def _conv_pre(x, state, kernel, bias, mask):
    """fp32 conv + bias: x (b, l, e), state (b, w - 1, e), kernel (w, e), bias (e,), mask
    (b, l, w) or None -> (b, l, e). Tap k of output t reads xp[t + k], the input w - 1 - k
    positions back; mask[t, k] = 0 drops it (an input of another packed segment)."""
    width, length = kernel.shape[0], x.shape[1]
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1).astype(jnp.float32)  # (b, l+w-1, e)
    k32 = kernel.astype(jnp.float32)
    pre = 0.0
    for k in range(width):
        tap = xp[:, k : k + length] * k32[k]  # (b, l, e)
        pre = pre + (tap if mask is None else tap * mask[:, :, k, None])
    return pre + bias.astype(jnp.float32), xp


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def causal_conv1d_silu(x, state, kernel, bias, out_dtype, mask=None):
    """silu(causal depthwise conv(x) + bias), accumulated in fp32, cast to out_dtype.

    x: (b, l, e); state: (b, w - 1, e) the inputs before x (zeros at a sequence start); kernel:
    (w, e); bias: (e,); mask: (b, l, w) float or None (see `conv_segment_mask`). The VJP keeps
    only its inputs and recomputes the conv (w multiply-adds per element), so a training step
    stores x once instead of the conv output and its SiLU."""
    return jax.nn.silu(_conv_pre(x, state, kernel, bias, mask)[0]).astype(out_dtype)


def _conv_silu_fwd(x, state, kernel, bias, out_dtype, mask):
    out = causal_conv1d_silu(x, state, kernel, bias, out_dtype, mask)
    return out, (x, state, kernel, bias, mask)


def _conv_silu_bwd(out_dtype, res, g):
    x, state, kernel, bias, mask = res
    width, length = kernel.shape[0], x.shape[1]
    pre, xp = _conv_pre(x, state, kernel, bias, mask)
    sig = jax.nn.sigmoid(pre)
    dpre = g.astype(jnp.float32) * sig * (1.0 + pre * (1.0 - sig))  # (b, l, e)
    k32 = kernel.astype(jnp.float32)
    # Output t reads xp[t + k] through tap k: xp[t + k] gets kernel[k] * dpre[t] (masked).
    dxp = jnp.zeros(xp.shape, jnp.float32)  # (b, l + w - 1, e)
    dkernel = []
    for k in range(width):
        dk = dpre if mask is None else dpre * mask[:, :, k, None]
        dxp = dxp.at[:, k : k + length].add(dk * k32[k])
        dkernel.append(jnp.sum(xp[:, k : k + length] * dk, axis=(0, 1)))
    dx, dstate = dxp[:, width - 1 :], dxp[:, : width - 1]
    dbias = jnp.sum(dpre, axis=(0, 1))
    dmask = None if mask is None else jnp.zeros_like(mask)  # segment boundaries are data
    return (dx.astype(x.dtype), dstate.astype(state.dtype),
            jnp.stack(dkernel).astype(kernel.dtype), dbias.astype(bias.dtype), dmask)  # fmt: skip


def conv_segment_mask(segment_ids, width: int):
    """segment_ids (b, l) int -> (b, l, w) float32: mask[t, k] = 1 where the input w - 1 - k
    positions before t is in t's segment. Positions before the row's start (the conv state)
    count as the first position's segment, so a state carried from a previous window feeds the
    row's first segment."""
    b, length = segment_ids.shape
    padded = jnp.concatenate(
        [jnp.broadcast_to(segment_ids[:, :1], (b, width - 1)), segment_ids], axis=1
    )  # (b, l + w - 1)
    taps = [padded[:, k : k + length] == segment_ids for k in range(width)]
    return jnp.stack(taps, axis=-1).astype(jnp.float32)


causal_conv1d_silu.defvjp(_conv_silu_fwd, _conv_silu_bwd)


def conv_tail(x, state, width: int, last=None, segment_ids=None):
    """The causal conv's state after x: the w - 1 inputs up to and including position `last`.

    x: (b, l, e); state: (b, w - 1, e), the inputs before x, or None (zeros); last: (b,) int, the
    last position each row consumed (-1 for none; default l - 1: right-padded rows stop at their
    last real token); segment_ids: (b, l) int or None. Inputs of another segment than the one at
    `last` are zeroed, so a state carried into the next window holds only that segment's inputs
    (positions before the row count as its first position's segment, as in `conv_segment_mask`).
    Returns (b, w - 1, e) in x's dtype."""
    bsz, length, e = x.shape
    if state is None:
        state = jnp.zeros((bsz, width - 1, e), x.dtype)
    xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # (b, l + w - 1, e)
    if last is None:
        last = jnp.full((bsz,), length - 1, jnp.int32)
    # Input t sits at xp[t + w - 1]: the window ending at `last` is xp[last + 1 : last + w].
    idx = last[:, None] + 1 + jnp.arange(width - 1)  # (b, w - 1)
    tail = jnp.take_along_axis(xp, idx[:, :, None], axis=1)
    if segment_ids is not None:
        ids = jnp.concatenate(
            [jnp.broadcast_to(segment_ids[:, :1], (bsz, width - 1)), segment_ids], axis=1
        )  # (b, l + w - 1)
        own = jnp.take_along_axis(ids, idx, axis=1) == jnp.take_along_axis(
            ids, (last + width - 1)[:, None], axis=1
        )
        tail = tail * own[:, :, None].astype(tail.dtype)
    return tail


def causal_conv1d_step(x, state, kernel, bias, out_dtype, *, silu=False):
    """The causal conv at one new position, for decoding.

    x: (b, e) the new input; state: (b, w - 1, e) the previous w - 1 inputs; kernel: (w, e); bias:
    (e,) or None. Returns (out (b, e) in out_dtype, new state (b, w - 1, e)). The sum is the one
    `causal_conv1d_silu` takes at a position, in fp32, written as w elementwise products (one
    fused kernel; an einsum here becomes a batched dot with transposes)."""
    window = jnp.concatenate([state.astype(x.dtype), x[:, None]], axis=1)  # (b, w, e)
    k32 = kernel.astype(jnp.float32)
    pre = sum(window[:, k].astype(jnp.float32) * k32[k] for k in range(kernel.shape[0]))  # (b, e)
    if bias is not None:
        pre = pre + bias.astype(jnp.float32)
    return (jax.nn.silu(pre) if silu else pre).astype(out_dtype), window[:, 1:]


class CausalConv1d(nnx.Module):
    """Depthwise causal convolution over time, channels-last.

    kernel: (w, e), bias: (e,). out_t = sum_k kernel[k] * x[t - (w - 1) + k] + bias, with x = 0
    before the sequence start (or the cached previous inputs when decoding).
    """

    def __init__(self, channels: int, width: int, *, use_bias=True, dtype=jnp.float32,
                 param_dtype=jnp.float32, impl: str = "auto", rngs: nnx.Rngs):  # fmt: skip
        if impl not in CONV_IMPLS:
            raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}")
        self.width = width
        self.dtype = dtype
        self.impl = impl
        init = torch_linear_init(width)  # PyTorch's fan_in for a depthwise conv is 1 * width
        self.kernel = logical_param(
            init(rngs.params(), (width, channels), param_dtype), ("conv", "inner")
        )
        self.bias = (
            logical_param(init(rngs.params(), (channels,), param_dtype), ("inner",))
            if use_bias
            else None
        )

    def __call__(self, x, state=None, *, silu=False, mask=None):
        """x: (b, l, e); state: (b, w - 1, e) previous inputs or None; mask: (b, l, w) from
        `conv_segment_mask` or None (packed rows: no tap reaches into another segment).

        Returns (out (b, l, e), new state (b, w - 1, e): the last w - 1 inputs). With silu=True,
        out is silu(conv(x) + bias), accumulated in fp32 as one op with its own VJP
        (`causal_conv1d_silu`)."""
        # With the length split over a mesh, each shard convolves its own block, its state the
        # previous shard's last w - 1 inputs (a halo; scan_sharding.sharded_causal_conv).
        bias = None if self.bias is None else self.bias[...]
        kernel = silu and mask is None and resolve_conv_impl(self.impl, self.width, x.dtype)
        conv = functools.partial(self._conv, silu=silu, use_kernel=kernel)
        # A Pallas call is opaque to XLA's partitioner: under a mesh it runs on per-device blocks.
        return sharded_causal_conv(conv, x, self.kernel[...], bias, state, mask, manual=kernel)

    def _conv(self, x, kernel, bias, state, mask=None, *, silu=False, use_kernel=False):
        """`__call__` on arrays: kernel (w, e), bias (e,) or None, state (b, w - 1, e) or None,
        mask (b, l, w) or None. use_kernel: the conv + SiLU by pallas_kernels.causal_conv."""
        bsz, length, e = x.shape
        if state is None:
            state = jnp.zeros((bsz, self.width - 1, e), x.dtype)
        if silu:
            bias = jnp.zeros((e,), jnp.float32) if bias is None else bias
            if use_kernel:
                from pallas_kernels.causal_conv import causal_conv1d_silu_pallas

                out = causal_conv1d_silu_pallas(x, state, kernel, bias, jnp.dtype(self.dtype))
            else:
                out = causal_conv1d_silu(x, state, kernel, bias, jnp.dtype(self.dtype), mask)
            tail = jnp.concatenate([state.astype(x.dtype), x[:, -(self.width - 1) :]], axis=1)
            return out, tail[:, tail.shape[1] - (self.width - 1) :]
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # (b, l + w - 1, e)
        kernel = kernel.astype(self.dtype)
        taps = [xp[:, k : k + length] * kernel[k] for k in range(self.width)]  # (b, l, e) each
        if mask is not None:
            taps = [t * mask[:, :, k, None].astype(t.dtype) for k, t in enumerate(taps)]
        out = sum(taps)
        if bias is not None:
            out = out + bias.astype(self.dtype)
        return out.astype(self.dtype), xp[:, xp.shape[1] - (self.width - 1) :]

    def step(self, x, state, *, silu=False):
        """x: (b, e); state: (b, w - 1, e). Returns (out (b, e), new state (b, w - 1, e)), with
        silu=True out = silu(conv + bias): `causal_conv1d_step` on this module's weights."""
        bias = None if self.bias is None else self.bias[...]
        return causal_conv1d_step(x, state, self.kernel[...], bias, self.dtype, silu=silu)
