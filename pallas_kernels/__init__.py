"""Pallas selective-scan kernels for NVIDIA Hopper (Mosaic GPU), runnable in interpret mode on CPU.

    y, final_state = selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias,
                                           delta_softplus=True, initial_state=None,
                                           segment_ids=None)

Semantics are mamba_jax.scan.selective_scan's (see its docstring); this package knows nothing of
Flax or of mamba_jax. The README beside this file describes the algorithm and the timings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels._common import BlockSizes
from pallas_kernels._validation import (
    SCAN_CHECKPOINTS,
    name_checkpoints,
    size_reason,
    validate_scan_args,
    validate_segment_ids,
)
from pallas_kernels.selective_scan_bwd import backward
from pallas_kernels.selective_scan_fwd import forward
from pallas_kernels.tpu_scan import TpuBlockSizes, selective_scan_tpu, tpu_unsupported_reason

__all__ = [
    "BlockSizes",
    "SCAN_CHECKPOINTS",
    "TpuBlockSizes",
    "selective_scan_pallas",
    "selective_scan_tpu",
    "supported",
    "unsupported_reason",
]
PLATFORMS = (None, "gpu", "tpu")

MAX_D_STATE = 256


def _platform(platform, backend=None):
    """The kernel family a call uses: the one asked for, else TPU on a TPU backend, else GPU."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    return platform or ("tpu" if (backend or jax.default_backend()) == "tpu" else "gpu")


def unsupported_reason(
    *, batch, length, d, n, groups, dtype, backend=None, interpret=False, platform=None
):
    """None when the kernel handles this call on `backend` (default jax.default_backend()).
    platform: "gpu" (Mosaic GPU), "tpu" (Mosaic TPU) or None (TPU on a TPU backend, else GPU)."""
    if _platform(platform, backend) == "tpu":
        reason = tpu_unsupported_reason(
            batch=batch, length=length, d=d, n=n, groups=groups, dtype=dtype
        )
        backend = backend or jax.default_backend()
        if reason is None and not interpret and backend != "tpu":
            reason = f"the Mosaic TPU kernel needs a TPU backend, got {backend!r}"
        return reason
    reason = size_reason(
        batch=batch, length=length, d=d, n=n, groups=groups, dtype=dtype, max_d_state=MAX_D_STATE
    )
    if reason is not None:
        return reason
    if interpret:
        return None
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return f"the Mosaic GPU kernel needs a GPU backend, got {backend!r}"
    try:
        kind = jax.devices("gpu")[0].device_kind
        cap = getattr(jax.devices("gpu")[0], "compute_capability", None)
    except RuntimeError as err:
        return f"no GPU device: {err}"
    if cap is not None and not str(cap).startswith("9"):
        return f"the kernel targets Hopper (compute capability 9.x), got {kind} ({cap})"
    if cap is None and "H100" not in kind and "H200" not in kind and "H800" not in kind:
        return f"the kernel targets Hopper GPUs, got {kind}"
    return None


def supported(**kwargs) -> bool:
    return unsupported_reason(**kwargs) is None


def selective_scan_pallas(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                          delta_softplus=False, initial_state=None, segment_ids=None,
                          platform=None, interpret=False, block_sizes=None):  # fmt: skip
    """u, delta, z: (b, l, e); A: (e, n) f32; B, C: (b, l, n) or (b, l, g, n); D, delta_bias: (e,)
    f32; initial_state: (b, e, n) f32 or None; segment_ids: (b, l) int or None (packed rows: the
    state restarts from zero where the id changes from the previous position's; the initial state
    feeds the first segment). Returns (y (b, l, e) in u.dtype, final_state (b, e, n) f32).
    Differentiable (custom_vjp) in every float argument, including initial_state, and through
    final_state. platform: "gpu", "tpu" or None (TPU on a TPU backend, else GPU).
    interpret=True (or plgpu.InterpretGPUParams / pltpu.InterpretParams) runs on CPU;
    block_sizes: BlockSizes for the GPU kernels, TpuBlockSizes for the TPU ones."""
    if _platform(platform) == "tpu":
        if block_sizes is not None and not isinstance(block_sizes, TpuBlockSizes):
            raise ValueError(
                f"block_sizes must be a TpuBlockSizes on TPU, got {type(block_sizes).__name__}"
            )
        if not interpret and jax.default_backend() != "tpu":
            raise ValueError(
                "selective_scan_pallas(platform='tpu') needs a TPU backend or interpret=True, "
                f"got backend {jax.default_backend()!r}"
            )
        return selective_scan_tpu(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            delta_softplus=delta_softplus,
            initial_state=initial_state,
            segment_ids=segment_ids,
            interpret=interpret,
            block_sizes=block_sizes,
        )
    b, length, e, n, g = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if segment_ids is not None:
        validate_segment_ids(segment_ids, b, length)
    reason = unsupported_reason(
        batch=b, length=length, d=e, n=n, groups=g, dtype=u.dtype, interpret=bool(interpret)
    )
    if reason is not None:
        raise ValueError(f"selective_scan_pallas cannot run this call: {reason}")
    plan = cm.make_plan(b, length, e, n, g, block_sizes or BlockSizes())
    Bg = B if B.ndim == 4 else B[:, :, None, :]
    Cg = C if C.ndim == 4 else C[:, :, None, :]
    # The state and its parameters are fp32 inside (casts outside the custom_vjp return their
    # cotangents in the caller's dtypes).
    f32 = lambda x, shape: jnp.zeros(shape, jnp.float32) if x is None else x.astype(jnp.float32)
    A, D, delta_bias = A.astype(jnp.float32), f32(D, (e,)), f32(delta_bias, (e,))
    h0 = f32(initial_state, (b, e, n))
    z_arg = z if z is not None else jnp.zeros((), u.dtype)
    meta = (tuple(Bg.shape), jnp.dtype(B.dtype), jnp.dtype(C.dtype), jnp.dtype(z_arg.dtype))
    static = (plan, bool(delta_softplus), interpret, z is not None, meta)
    # Segment starts as exponent offsets (0, or -inf where the decay must vanish), data only: no
    # gradient flows to segment_ids. None keeps the kernels exactly as without segments.
    reset = None if segment_ids is None else cm.segment_resets(segment_ids, plan)
    return _scan(static, u, delta, z_arg, Bg, Cg, A, D, delta_bias, h0, reset)


def _pad_operands(plan, u, delta, z, B, C, A, D, bias, h0):
    pc, pl_, nt = cm.pad_channels, cm.pad_last, plan.n_total
    plen = lambda x: cm.pad_length(x, plan)
    u, delta = plen(pc(u, plan, 2)), plen(pc(delta, plan, 2))
    z = plen(pc(z, plan, 2)) if z.ndim else None
    # B and C as fp32 once here (tiny): every thread reads each token's whole B, C rows, and
    # fp32 rows need no per-thread conversion in the token loop.
    B, C = plen(pl_(B.astype(jnp.float32), nt)), plen(pl_(C.astype(jnp.float32), nt))
    # The kernels compute exp(dt A) as exp2(dt A log2 e): A goes in pre-scaled (the backward's
    # dA is still the gradient with respect to the caller's A).
    A = pl_(pc(A * cm.LOG2E, plan, 0), nt)
    D, bias = pc(D, plan, 0), pc(bias, plan, 0)
    h0 = pl_(pc(h0, plan, 1), nt)
    return u, delta, z, B, C, A, D, bias, h0


def _state_slices(plan):
    return [slice(i * plan.n_pad, (i + 1) * plan.n_pad) for i in range(plan.n_split)]


def _silu_parts(z):
    zf = z.astype(jnp.float32)
    sig = jax.nn.sigmoid(zf)
    return zf * sig, sig * (1.0 + zf * (1.0 - sig))  # silu(z), silu'(z)


# The padding, kernels and unpadding of one call run under jax.jit (static: the plan and flags):
# a model that applies its layers one by one (MambaConfig.scan_layers=False) then traces and
# lowers each kernel once, and every layer calls that one function. Traced inline, each layer
# lowered its own copy of every kernel: 96 Mosaic GPU modules (49 MB of StableHLO) for the 130m
# train step, against 4 with the jit.
@functools.partial(jax.jit, static_argnums=(0, 11))
def _forward(static, u, delta, z, B, C, A, D, bias, h0, reset, save):
    plan, softplus, interpret = static[:3]
    padded = _pad_operands(plan, u, delta, z, B, C, A, D, bias, h0)
    u_, delta_, z_, B_, C_, A_, D_, bias_, h0_ = padded
    kw = dict(delta_softplus=softplus, save_checkpoints=save, reset=reset, interpret=interpret)
    if plan.n_split == 1:
        y, h, ckpt, _ = forward(*padded, plan, **kw)
        res = (padded, [ckpt], None, reset)
    else:
        # d_state > 16: independent 16-state scans whose partial outputs sum to y before D and z.
        outs = [
            forward(
                u_,
                delta_,
                None,
                B_[..., sl],
                C_[..., sl],
                A_[:, sl],
                jnp.zeros_like(D_),
                bias_,
                h0_[..., sl],
                plan,
                y_dtype=jnp.float32,
                **kw,
            )  # fmt: skip
            for sl in _state_slices(plan)
        ]
        y_pre = sum(o[0] for o in outs) + u_.astype(jnp.float32) * D_
        y = y_pre if z_ is None else y_pre * _silu_parts(z_)[0]
        y, h = y.astype(u.dtype), jnp.concatenate([o[1] for o in outs], axis=-1)
        res = (padded, [o[2] for o in outs], y_pre, reset)
    y = cm.unpad_channels(y[:, : plan.length], plan, 2)
    h = cm.unpad_channels(h[..., : plan.n], plan, 1)
    return (y, h), res


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static, u, delta, z, B, C, A, D, bias, h0, reset):
    return _forward(static, u, delta, z, B, C, A, D, bias, h0, reset, save=False)[0]


def _scan_fwd(static, u, delta, z, B, C, A, D, bias, h0, reset):
    out, (padded, ckpts, y_pre, reset) = _forward(
        static, u, delta, z, B, C, A, D, bias, h0, reset, save=True
    )
    # Inside a scan over layers the saved checkpoints (and, without remat, y) are stacked by
    # dynamic-update-slice. XLA's GPU dynamic-slice fusion then clones the kernel call to write
    # straight into the stack and keeps the original for y's other users: the forward kernel ran
    # twice per layer (measured, pallas_kernels/NOTES.md). The barrier stops that rewrite.
    out, ckpts, y_pre = jax.lax.optimization_barrier((out, ckpts, y_pre))
    return out, (padded, name_checkpoints(ckpts), name_checkpoints(y_pre), reset)


def _backward_split(plan, softplus, interpret, padded, ckpts, y_pre, reset, gy, gh):
    """d_state > 16: the z gate and D skip in JAX, then one backward kernel per 16 states."""
    u, delta, z, B, C, A, D, bias, _ = padded
    gy = gy.astype(jnp.float32)
    dz = None
    if z is not None:
        silu, dsilu = _silu_parts(z)
        gy, dz = gy * silu, (gy * y_pre * dsilu).astype(z.dtype)
    parts = [
        backward(
            u,
            delta,
            None,
            B[..., sl],
            C[..., sl],
            A[:, sl],
            jnp.zeros_like(D),
            bias,
            ck,
            gy,
            gh[..., sl],
            plan,
            delta_softplus=softplus,
            grad_dtype=jnp.float32,
            reset=reset,
            interpret=interpret,
        )  # fmt: skip
        for sl, ck in zip(_state_slices(plan), ckpts, strict=True)
    ]
    du = sum(p[0] for p in parts) + gy * D
    cat = lambda i: jnp.concatenate([p[i] for p in parts], axis=-1)
    dD = jnp.sum(gy * u.astype(jnp.float32), axis=(0, 1))
    return (du.astype(u.dtype), sum(p[1] for p in parts).astype(delta.dtype), dz, cat(3),
            cat(4), cat(5), dD, sum(p[7] for p in parts), cat(8))  # fmt: skip


@functools.partial(jax.jit, static_argnums=0)
def _scan_bwd(static, res, cotangents):
    plan, softplus, interpret, has_z, (b_shape, b_dtype, c_dtype, z_dtype) = static
    padded, ckpts, y_pre, reset = res
    gy, gh = cotangents
    gy = cm.pad_length(cm.pad_channels(gy, plan, 2), plan)
    gh = cm.pad_last(cm.pad_channels(gh, plan, 1), plan.n_total)
    if plan.n_split == 1:
        u, delta, z, B, C, A, D, bias, _ = padded
        grads = backward(u, delta, z, B, C, A, D, bias, ckpts[0], gy, gh, plan,
                         delta_softplus=softplus, reset=reset, interpret=interpret)  # fmt: skip
    else:
        grads = _backward_split(plan, softplus, interpret, padded, ckpts, y_pre, reset, gy, gh)
    du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = grads
    L = plan.length
    uc = lambda x, axis: cm.unpad_channels(x, plan, axis)
    du, ddelta = uc(du[:, :L], 2), uc(ddelta[:, :L], 2)
    dz = uc(dz[:, :L], 2) if has_z else jnp.zeros((), z_dtype)
    n = plan.n
    dB, dC = dB[:, :L, ..., :n].reshape(b_shape), dC[:, :L, ..., :n].reshape(b_shape)
    dA = uc(dA[:, :n], 0)
    dD, dbias = uc(dD, 0), uc(dbias, 0)
    dh0 = uc(dh0[..., :n], 1)
    d_reset = None if reset is None else jnp.zeros_like(reset)  # segment starts are data
    return (du, ddelta, dz, dB.astype(b_dtype), dC.astype(c_dtype), dA, dD, dbias, dh0, d_reset)


_scan.defvjp(_scan_fwd, _scan_bwd)
