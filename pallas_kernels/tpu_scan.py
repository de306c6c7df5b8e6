"""The selective scan on TPU: a Pallas Mosaic TPU kernel pair with a custom_vjp.

    y, final_state = selective_scan_tpu(u, delta, A, B, C, D, z, delta_bias,
                                        delta_softplus=True, initial_state=None)

Semantics are mamba_jax.scan.selective_scan's (see its docstring): Δ' = softplus(delta + bias),
h_t = exp(Δ'_t A) h_{t-1} + Δ'_t u_t B_t, y_t = h_t · C_t + D u_t, out_t = y_t silu(z_t). The
kernels and their VMEM layout are described in tpu_scan_kernels.py. This file pads and lays out
the operands, and differentiates through everything (custom_vjp): u, delta, A, B, C, D, z,
delta_bias, initial_state, and the final state's cotangent.

Verified on CPU only: interpret mode against the reference, and lowering for TPU
(`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`). Mosaic's own compilation and the
speed are unverified: no TPU was reachable (see pallas_kernels/README.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import tpu_scan_kernels as kernels
from pallas_kernels._validation import (
    name_checkpoints,
    size_reason,
    validate_scan_args,
    validate_segment_ids,
)

MAX_D_STATE = 256
LANES = kernels.LANES
PICKS = ("gather", "reduce")
# Below Mosaic's default scoped VMEM limit ("16MB+" in jax's docs/pallas/tpu/details.rst), with
# room for spilled registers.
VMEM_BUDGET = 12 * 2**20


@dataclasses.dataclass(frozen=True)
class TpuBlockSizes:
    """Tiling of the TPU kernels.

    seq_tile: tokens per grid step (a multiple of 128; shorter sequences use one 128-multiple tile).
      Halved (down to 128) while the backward's VMEM estimate exceeds the budget (below).
    lanes: channels per grid step (a multiple of 128): the state block is (n, lanes) fp32.
    state_chunk: states updated together in registers (a multiple of 8; None: 16, or 8 when 8
      divides n_pad but 16 does not). d_state above it runs chunk after chunk over the same tile.
    pick: how a token's B and C columns are taken from the (n, 128) slabs that hold 128 tokens on
      lanes: "gather" (an in-register lane gather) or "reduce" (masked lane sum); see
      tpu_scan_kernels._column_picker.
    vmem_limit_bytes: passed to Mosaic (None: its default scoped limit). The tile budget is 3/4 of
      it, or VMEM_BUDGET when None.
    """

    seq_tile: int = 512
    lanes: int = 128
    state_chunk: int | None = None
    pick: str = "gather"
    vmem_limit_bytes: int | None = None

    def __post_init__(self):
        if self.seq_tile < LANES or self.seq_tile % LANES:
            raise ValueError(f"TpuBlockSizes: seq_tile={self.seq_tile} must be a multiple of 128")
        if self.lanes < LANES or self.lanes % LANES:
            raise ValueError(f"TpuBlockSizes: lanes={self.lanes} must be a multiple of 128")
        if self.pick not in PICKS:
            raise ValueError(f"TpuBlockSizes: pick must be one of {PICKS}, got {self.pick!r}")
        if self.state_chunk is not None and (self.state_chunk < 8 or self.state_chunk % 8):
            raise ValueError(
                f"TpuBlockSizes: state_chunk={self.state_chunk} must be a positive multiple of 8"
            )


@dataclasses.dataclass(frozen=True)
class TpuPlan:
    """Static sizes of one call after padding: e to g groups of p_pad channels (p_pad % lanes == 0,
    so no channel tile straddles a group), n to n_pad (a multiple of 8), L to whole tiles."""

    b: int
    length: int
    e: int
    n: int
    g: int
    p: int  # channels per group
    p_pad: int
    n_pad: int
    state_chunk: int
    seq_tile: int
    lanes: int
    pick: str
    vmem_limit_bytes: int | None

    @property
    def e_pad(self):
        return self.g * self.p_pad

    @property
    def n_lane_tiles(self):
        return self.e_pad // self.lanes

    @property
    def tiles_per_group(self):
        return self.p_pad // self.lanes

    @property
    def n_seq_tiles(self):
        return -(-self.length // self.seq_tile)

    @property
    def length_pad(self):
        return self.n_seq_tiles * self.seq_tile

    @property
    def n_state_chunks(self):
        return self.n_pad // self.state_chunk


def make_tpu_plan(b, length, e, n, g, block_sizes: TpuBlockSizes | None = None) -> TpuPlan:
    bs = block_sizes or TpuBlockSizes()
    p = e // g
    p_pad = -(-p // bs.lanes) * bs.lanes
    n_pad = -(-n // 8) * 8
    chunk = bs.state_chunk or (16 if n_pad % 16 == 0 else 8)
    if n_pad % chunk:
        n_pad = -(-n_pad // chunk) * chunk
    seq_tile = min(bs.seq_tile, -(-length // LANES) * LANES)
    budget = VMEM_BUDGET if bs.vmem_limit_bytes is None else bs.vmem_limit_bytes * 3 // 4
    while seq_tile > LANES and bwd_vmem_bytes(seq_tile, bs.lanes, n_pad, chunk) > budget:
        seq_tile = max(LANES, seq_tile // 2 // LANES * LANES)
    return TpuPlan(
        b, length, e, n, g, p, p_pad, n_pad, chunk, seq_tile, bs.lanes, bs.pick, bs.vmem_limit_bytes
    )


def bwd_vmem_bytes(seq_tile, lanes, n_pad, state_chunk):
    """VMEM the backward kernel needs (the larger of the two), inputs taken as 4 bytes: the
    double-buffered blocks, the scratch, and the recomputed states of one chunk."""
    T, W, f32 = seq_tile, lanes, 4
    tokens = 7 * 2 * T * W * f32  # u, delta, z, gy in; du, ddelta, dz out
    bc = 4 * 2 * T * n_pad * f32  # B^T, C^T in; dB^T, dC^T partials out
    states = 5 * 2 * n_pad * W * f32  # A^T, tile-start state, dL/dh_L in; dA, dh0 out
    scratch = 2 * n_pad * W * f32 + 6 * T * W * f32 + (T + 1) * state_chunk * W * f32
    return tokens + bc + states + scratch


def tpu_unsupported_reason(*, batch, length, d, n, groups, dtype):
    """None when the TPU kernel takes this call (any backend can trace it; it runs on a TPU, or
    anywhere in interpret mode)."""
    return size_reason(
        batch=batch, length=length, d=d, n=n, groups=groups, dtype=dtype, max_d_state=MAX_D_STATE
    )


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
    b, length, e, n, g = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    reason = tpu_unsupported_reason(batch=b, length=length, d=e, n=n, groups=g, dtype=u.dtype)
    if reason is not None:
        raise ValueError(f"selective_scan_tpu cannot run this call: {reason}")
    return b, length, e, n, g


def selective_scan_tpu(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    delta_softplus=False,
    initial_state=None,
    segment_ids=None,
    interpret=False,
    block_sizes: TpuBlockSizes | None = None,
):
    """u, delta, z: (b, l, e); A: (e, n); B, C: (b, l, n) or (b, l, g, n); D, delta_bias: (e,);
    initial_state: (b, e, n) or None; segment_ids: (b, l) int or None (packed rows: the state
    restarts from zero where the id differs from the previous position's; the initial state feeds
    the first segment). Returns (y (b, l, e) in u.dtype, final_state (b, e, n) f32),
    differentiable in every float argument and through final_state.

    interpret: False (compile with Mosaic: TPU only); True (Pallas's generic interpreter, any
    backend: fast, what most tests use); or a pltpu.InterpretParams (the TPU interpreter, which
    simulates VMEM and the grid, raises on out-of-bounds reads and can detect races; slow)."""
    b, length, e, n, g = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    keep = None if segment_ids is None else _segment_keep(segment_ids, b, length)
    plan = make_tpu_plan(b, length, e, n, g, block_sizes)
    Bg = B if B.ndim == 4 else B[:, :, None, :]
    Cg = C if C.ndim == 4 else C[:, :, None, :]
    f32 = lambda x, shape: jnp.zeros(shape, jnp.float32) if x is None else x.astype(jnp.float32)
    z_arg = z if z is not None else jnp.zeros((), u.dtype)
    static = (
        plan,
        bool(delta_softplus),
        interpret,
        z is not None,
        jnp.dtype(B.dtype),
        jnp.dtype(C.dtype),
    )
    return _scan(
        static,
        u,
        delta,
        z_arg,
        Bg,
        Cg,
        A.astype(jnp.float32),
        f32(D, (e,)),
        f32(delta_bias, (e,)),
        f32(initial_state, (b, e, n)),
        keep,
    )


def _segment_keep(segment_ids, b, length):
    """(b, l) int -> (b, l) f32: 0 where a segment starts (the id differs from the previous
    position's), 1 elsewhere and at position 0. It multiplies that token's decay exp(Δ'A)."""
    validate_segment_ids(segment_ids, b, length)
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    return jnp.concatenate([jnp.ones((b, 1), bool), same], axis=1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# Layout: padding outside the kernel (XLA), and back.


def _pad_axis(x, axis, size):
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _pad_channels(x, plan, axis):
    """Channel axis e = g * p -> g * p_pad, each group padded at its end."""
    if plan.p_pad == plan.p:
        return x
    x = x.reshape(*x.shape[:axis], plan.g, plan.p, *x.shape[axis + 1 :])
    return _pad_axis(x, axis + 1, plan.p_pad).reshape(
        *x.shape[:axis], plan.e_pad, *x.shape[axis + 2 :]
    )


def _unpad_channels(x, plan, axis):
    if plan.p_pad == plan.p:
        return x
    x = x.reshape(*x.shape[:axis], plan.g, plan.p_pad, *x.shape[axis + 1 :])
    x = jax.lax.slice_in_dim(x, 0, plan.p, axis=axis + 1)
    return x.reshape(*x.shape[:axis], plan.e, *x.shape[axis + 2 :])


def _tokens(x, plan):
    """(b, l, e) -> (b, L_pad, e_pad), dtype kept."""
    return _pad_axis(_pad_channels(x, plan, 2), 1, plan.length_pad)


def _transpose_bc(x, plan):
    """(b, l, g, n) -> (b, g, L_pad/128, n_pad, 128) fp32: tokens on lanes, states on sublanes."""
    x = _pad_axis(_pad_axis(x.astype(jnp.float32), 3, plan.n_pad), 1, plan.length_pad)
    x = x.reshape(plan.b, plan.length_pad // LANES, LANES, plan.g, plan.n_pad)
    return x.transpose(0, 3, 1, 4, 2)


def _untranspose_bc(x, plan):
    """Per channel tile partials (b, e_pad/W, L_pad/128, n_pad, 128) -> (b, l, g, n) summed over
    each group's tiles in a fixed order."""
    x = x.reshape(plan.b, plan.g, plan.tiles_per_group, *x.shape[2:]).sum(axis=2)
    x = x.transpose(0, 2, 4, 1, 3).reshape(plan.b, plan.length_pad, plan.g, plan.n_pad)
    return x[:, : plan.length, :, : plan.n]


def _states_in(h, plan):
    """(b, e, n) -> (b, n_pad, e_pad): states on sublanes, channels on lanes."""
    return _pad_axis(_pad_channels(h, plan, 1), 2, plan.n_pad).transpose(0, 2, 1)


def _states_out(h, plan):
    return _unpad_channels(h.transpose(0, 2, 1)[..., : plan.n], plan, 1)


def _keep_lanes(keep, plan):
    """(b, l) -> (b, L_pad/128, 8, 128) fp32, tokens on lanes (8 equal sublanes: one vreg tile);
    padded tokens keep 1 (with Δ' = 0 they are identity steps)."""
    keep = jnp.pad(keep, ((0, 0), (0, plan.length_pad - plan.length)), constant_values=1.0)
    keep = keep.reshape(plan.b, plan.length_pad // LANES, 1, LANES)
    return jnp.broadcast_to(keep, (plan.b, plan.length_pad // LANES, 8, LANES))


def _prepare(plan, u, delta, z, B, C, A, D, bias, h0, keep):
    at = _states_in(A[None], plan)[0]  # (n_pad, e_pad)
    row = lambda v: _pad_channels(v, plan, 0)[None]  # (1, e_pad)
    return (
        _tokens(u, plan),
        _tokens(delta, plan),
        None if z is None else _tokens(z, plan),
        _transpose_bc(B, plan),
        _transpose_bc(C, plan),
        at,
        row(D),
        row(bias),
        _states_in(h0, plan),
        None if keep is None else _keep_lanes(keep, plan),
    )


# ----------------------------------------------------------------------------------------------
# custom_vjp.


# Under jax.jit (static: the plan and flags, save): a model with unrolled layers traces and lowers
# each kernel once, as in pallas_kernels/__init__.py.
@functools.partial(jax.jit, static_argnums=0, static_argnames=("save",))
def _forward(static, u, delta, z, B, C, A, D, bias, h0, keep, save):
    plan, softplus, interpret, has_z = static[:4]
    ops = _prepare(plan, u, delta, z if has_z else None, B, C, A, D, bias, h0, keep)
    outs = kernels.forward(plan, softplus, save, interpret, *ops)
    y = _unpad_channels(outs[0][:, : plan.length], plan, 2)
    return (y, _states_out(outs[1], plan)), (ops, outs[2] if save else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(static, u, delta, z, B, C, A, D, bias, h0, keep):
    return _forward(static, u, delta, z, B, C, A, D, bias, h0, keep, save=False)[0]


def _scan_fwd(static, u, delta, z, B, C, A, D, bias, h0, keep):
    out, (ops, hstarts) = _forward(static, u, delta, z, B, C, A, D, bias, h0, keep, save=True)
    return out, (ops, name_checkpoints(hstarts))


@functools.partial(jax.jit, static_argnums=0)
def _scan_bwd(static, res, cotangents):
    plan, softplus, interpret, has_z, b_dtype, c_dtype = static
    ops, hstarts = res
    gy, gh = cotangents
    kt = ops[9]
    grads = kernels.backward(
        plan, softplus, interpret, *ops[:8], kt, hstarts, _tokens(gy, plan), _states_in(gh, plan)
    )
    du, ddelta = grads[:2]
    dz = grads[2] if has_z else None
    dbt, dct, da, dd, dbias, dh0 = grads[2 + has_z :]
    tok = lambda x: _unpad_channels(x[:, : plan.length], plan, 2)
    dB, dC = _untranspose_bc(dbt, plan), _untranspose_bc(dct, plan)  # (b, l, g, n)
    vec = lambda x: _unpad_channels(jnp.sum(x[:, 0], axis=0), plan, 0)  # sum over batch rows
    return (
        tok(du),
        tok(ddelta),
        tok(dz) if has_z else jnp.zeros((), gy.dtype),
        dB.astype(b_dtype),
        dC.astype(c_dtype),
        _states_out(jnp.sum(da, 0)[None], plan)[0],
        vec(dd),
        vec(dbias),
        _states_out(dh0, plan),
        None if kt is None else jnp.zeros((plan.b, plan.length), jnp.float32),  # data, no gradient
    )


_scan.defvjp(_scan_fwd, _scan_bwd)
