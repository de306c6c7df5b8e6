"""A fused selective scan in Triton for NVIDIA GPUs before Hopper (A100, L4, RTX), called from JAX
through jax-triton.

    y, final_state = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias,
                                           delta_softplus=True, initial_state=None,
                                           segment_ids=None)

Semantics are mamba_jax.scan.selective_scan's. The kernels live in `triton_scan_kernels.py`;
this module pads nothing in HBM, picks block sizes, splits long sequences across programs (the
per-split maps are chained in JAX, a tiny (b, splits, e, n) scan), and wires the custom_vjp.

Forward: one program per (channel block, sequence split, batch row) holds its channels' states
in registers (a thread per channel, the state entries in its registers) and walks its tokens one
by one; under differentiation it also stores the state before every `chunk` tokens,
(b, L / chunk, n, e) fp32, the only state tensor that reaches HBM. Backward: each program walks
its chunks in reverse, recomputes a chunk's states from its checkpoint into registers and runs
the adjoint recurrence backwards over them. dB and dC are written as partial sums per channel
block, dA, dD and d_delta_bias as partial sums per program; JAX adds them up, so the gradients
are bitwise deterministic (no atomics). Sequences too short of programs to fill the GPU are split
across programs: a first pass gives each split's affine map, JAX chains them (a tiny scan), and
the main pass starts every split from its true state.

Triton and jax_triton are imported only when a kernel runs, so importing this module needs
neither. `interpret=True` runs the same kernels in Triton's interpreter on CPU through
`jax.pure_callback` (needs triton and TRITON_INTERPRET=1 set before triton is first imported;
jax_triton is not needed): slow, for tests at tiny sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import threading

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._validation import (
    name_checkpoints,
    nvidia_gpu_reason,
    size_reason,
    validate_scan_args,
    validate_segment_ids,
)

__all__ = ["TritonBlockSizes", "selective_scan_triton", "triton_unsupported_reason"]

MAX_D_STATE = 256
LOG2E = 1.4426950408889634
# Below MIN_PROGRAMS warps the sequence is split across programs. How far: by default so that the
# programs fill whole waves of the GPU (`_split_for_waves`), given how many warps of each kernel an
# SM holds at once (its registers: offline ptxas for sm_90 at 32 channels, d_state <= 16, gives
# the forward 168 registers, 12 warps per SM, and the backward 255, 8 warps per SM; larger states
# are taken at 255). `TritonBlockSizes(target_warps=...)` instead aims for a number of warps, the
# rule before. On one H200 (2026-12-03, one run) filling waves took fwd+bwd at S1-S4 from 2.79 /
# 3.36 / 7.26 / 17.99 ms (aiming for 2112 warps) to 2.27 / 2.97 / 5.95 / 17.50.
NUM_SMS = 132
FWD_WARPS_PER_SM = 12
BWD_WARPS_PER_SM = 8
# The local pass of a split sequence, as a share of the main pass's work (SASS per token: forward
# 197 / 240, backward 204 / 672): what a split must win back.
FWD_LOCAL_COST = 0.8
BWD_LOCAL_COST = 0.3
MIN_PROGRAMS = 4096


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TritonBlockSizes:
    """Tile sizes of the Triton kernels (all optional).

    chunk: tokens per checkpoint and per backward chunk (a power of two; the backward keeps the
      chunk's states in registers).
    fwd_chunk: tokens the forward loads at once (a power of two; at least `chunk`).
    fwd_channels, bwd_channels: channels per program (powers of two). At 32 channels and one warp
      a thread owns a channel and its state entries; at 8 the state index spreads over 4 lanes
      (more, smaller programs; cheaper channel sums of dB and dC, dearer per-channel work).
    fwd_warps, bwd_warps: warps per program (None: one, more for very large tiles).
    min_programs: below this many warps (batch x channel blocks x warps) the sequence may be split
      across programs (a split costs one extra, lighter pass over the tokens), by default into
      as many pieces as fill whole waves of the GPU best.
    target_warps: if set, the split aims for this many warps instead (the rule before the
      wave-filling one; 2112 is four warps per H200 scheduler).
    min_split_chunks: a split is never shorter than this many chunks.
    bwd_sum_lanes: the backward sums the per-token dB and dC products over this many neighbouring
      channels in the kernel (a power of two; None: all of a program's channels) and writes one
      partial sum per group, which JAX adds up: fewer shuffle rounds per token, more partials
      written. Capped at bwd_channels.
    bwd_scatter: the backward sums the dB and dC products over the channels by recursive
      halving (each round a lane hands half of its rows to its partner and keeps the other
      half): NP - NP / 2**R shuffles per token and sum instead of NP log2(channels). One partial
      per program, as with the default sum; not combined with bwd_sum_lanes.
    fwd_warps_per_sm, bwd_warps_per_sm: warps of the forward / backward kernel an SM holds at
      once, for the wave-filling split (None: FWD_WARPS_PER_SM, BWD_WARPS_PER_SM at d_state <=
      16, 8 above; set them when other block sizes change the kernels' registers).
    """

    chunk: int | None = None
    fwd_chunk: int = 8
    fwd_channels: int | None = None
    bwd_channels: int | None = None
    fwd_warps: int | None = None
    bwd_warps: int | None = None
    num_stages: int = 1
    min_programs: int = MIN_PROGRAMS
    min_split_chunks: int = 8
    target_warps: int | None = None
    bwd_sum_lanes: int | None = None
    bwd_scatter: bool = False
    fwd_warps_per_sm: int | None = None
    bwd_warps_per_sm: int | None = None

    def __post_init__(self):
        for name in ("chunk", "fwd_chunk", "fwd_channels", "bwd_channels"):
            v = getattr(self, name)
            if v is not None and (v < 2 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 2, got {v}")
        if self.target_warps is not None and self.target_warps < 1:
            raise ValueError(f"target_warps must be positive, got {self.target_warps}")
        for name in ("fwd_warps_per_sm", "bwd_warps_per_sm"):
            v = getattr(self, name)
            if v is not None and not 1 <= v <= 64:
                raise ValueError(f"{name} must be in [1, 64], got {v}")
        for name in ("fwd_warps", "bwd_warps", "bwd_sum_lanes"):
            v = getattr(self, name)
            if v is not None and (v < 1 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.bwd_scatter and self.bwd_sum_lanes is not None:
            raise ValueError("bwd_scatter sums over all of a program's channels: leave "
                             f"bwd_sum_lanes unset, got {self.bwd_sum_lanes}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes of one call (hashable: it is the custom_vjp's static argument)."""

    batch: int
    length: int
    e: int
    n: int
    groups: int
    n_pad: int
    chunk: int  # tokens per checkpoint / backward chunk
    fwd_chunk: int  # tokens per forward chunk (a multiple of chunk)
    fwd_channels: int
    bwd_channels: int
    fwd_split: int  # forward chunks per split
    bwd_split: int  # backward chunks per split
    fwd_warps: int
    bwd_warps: int
    bwd_sum_lanes: int  # channels summed per dB / dC partial (divides bwd_channels)
    bwd_scatter: int  # rounds of the halving sum of dB / dC (0: a plain sum)
    num_stages: int
    bc_mode: int  # B, C words: 0 fp32, 1 bf16 pairs
    softplus: bool
    has_z: bool
    has_seg: bool
    interpret: bool

    @property
    def group_size(self):
        return self.e // self.groups

    @property
    def n_chunks(self):
        return -(-self.length // self.chunk)

    @property
    def fwd_chunks(self):
        return -(-self.length // self.fwd_chunk)

    @property
    def n_ckpt(self):
        return self.fwd_chunks * (self.fwd_chunk // self.chunk)

    def blocks_per_group(self, channels):
        return -(-self.group_size // channels)

    def n_splits(self, chunks_per_split, fwd=False):
        return -(-(self.fwd_chunks if fwd else self.n_chunks) // chunks_per_split)


def _split_for_waves(warps, n_chunks, max_splits, capacity, local_cost):
    """Chunks per split that minimise the time in waves: a split into s pieces runs warps x s
    programs, ceil(warps x s / capacity) waves of n_chunks / s chunks each, plus the local pass
    (local_cost of the main pass) when s > 1. Among costs within 3% of the best, the fewest
    splits (the chaining between splits is not free)."""
    costs = {}
    for s in range(1, max_splits + 1):
        cps = -(-n_chunks // s)
        ns = -(-n_chunks // cps)
        waves = -(-warps * ns // capacity)
        costs.setdefault(ns, (waves * cps * (1.0 + (local_cost if ns > 1 else 0.0)), cps))
    best = min(c for c, _ in costs.values())
    return next(cps for ns, (c, cps) in sorted(costs.items()) if c <= 1.03 * best)


def _capacity(num_sms, warps_per_sm, warps_per_program):
    """Warps the GPU runs at once when a program has warps_per_program warps."""
    return num_sms * max(1, warps_per_sm // warps_per_program) * warps_per_program


def _num_sms() -> int:
    """Streaming multiprocessors of the default device (NUM_SMS where it does not say)."""
    return int(getattr(jax.devices()[0], "core_count", None) or NUM_SMS)


def _chunks_per_split(warps, n_chunks, bs, capacity, local_cost):
    """Split the sequence only when the programs cannot fill the GPU."""
    if warps >= bs.min_programs:
        return n_chunks
    max_splits = max(1, n_chunks // bs.min_split_chunks)
    if bs.target_warps is None:
        return _split_for_waves(warps, n_chunks, max_splits, capacity, local_cost)
    splits = min(-(-bs.target_warps // warps), max_splits)
    return -(-n_chunks // max(1, splits))


def _bc_mode(*dtypes):
    # fp16 rows go as fp32 words (one conversion of a small (b, l, g, n) array).
    return 1 if all(d == jnp.bfloat16 for d in dtypes) else 0


def make_plan(b, length, e, n, g, bs, *, softplus, has_z, has_seg, interpret,
              bc_dtypes=(jnp.bfloat16,), num_sms=NUM_SMS) -> _Plan:  # fmt: skip
    n_pad = max(2, _pow2(n))
    p = e // g
    # A thread per channel (32 per warp) with its state entries in registers up to d_state 64;
    # 8 channels per warp (the state index over 4 lanes) above, to bound registers per thread.
    default_c = 32 if n_pad <= 64 else 8
    fwd_c = bs.fwd_channels or max(2, min(default_c, _pow2(p)))
    bwd_c = bs.bwd_channels or max(2, min(default_c, _pow2(p)))
    fwd_w = bs.fwd_warps or max(1, min(8, n_pad * fwd_c // 2048))
    bwd_w = bs.bwd_warps or max(1, min(8, n_pad * bwd_c // 2048))
    # The backward keeps a chunk's states in registers: at most ~64 values per thread.
    chunk = bs.chunk or max(2, min(4, 2048 * bwd_w // (n_pad * bwd_c)))
    fwd_chunk = max(chunk, bs.fwd_chunk)
    fwd_warps = b * g * -(-p // fwd_c) * fwd_w
    bwd_warps = b * g * -(-p // bwd_c) * bwd_w
    # Warps the GPU runs at once (d_state above 16: taken at 255 registers, 8 per SM).
    fwd_per_sm = bs.fwd_warps_per_sm or (FWD_WARPS_PER_SM if n_pad <= 16 else 8)
    bwd_per_sm = bs.bwd_warps_per_sm or (BWD_WARPS_PER_SM if n_pad <= 16 else 8)
    fwd_cap = _capacity(num_sms, fwd_per_sm, fwd_w)
    bwd_cap = _capacity(num_sms, bwd_per_sm, bwd_w)
    return _Plan(
        batch=b,
        length=length,
        e=e,
        n=n,
        groups=g,
        n_pad=n_pad,
        chunk=chunk,
        fwd_chunk=fwd_chunk,
        fwd_channels=fwd_c,
        bwd_channels=bwd_c,
        fwd_split=_chunks_per_split(
            fwd_warps, -(-length // fwd_chunk), bs, fwd_cap, FWD_LOCAL_COST
        ),
        bwd_split=_chunks_per_split(bwd_warps, -(-length // chunk), bs, bwd_cap, BWD_LOCAL_COST),
        fwd_warps=fwd_w,
        bwd_warps=bwd_w,
        bwd_sum_lanes=min(bs.bwd_sum_lanes or bwd_c, bwd_c),
        # Rounds within a warp's lanes; the sum over the rest (warps) is plain.
        bwd_scatter=min(n_pad, bwd_c, 32).bit_length() - 1 if bs.bwd_scatter else 0,
        num_stages=bs.num_stages,
        bc_mode=_bc_mode(*bc_dtypes),
        softplus=bool(softplus),
        has_z=bool(has_z),
        has_seg=bool(has_seg),
        interpret=bool(interpret),
    )


# ----------------------------------------------------------------------------------------------
# Support query.


def triton_unsupported_reason(*, batch, length, d, n, groups, dtype, backend=None) -> str | None:
    """None when the Triton kernel can run this call here; otherwise a one-line reason."""
    reason = size_reason(
        batch=batch, length=length, d=d, n=n, groups=groups, dtype=dtype, max_d_state=MAX_D_STATE
    )
    if reason is not None:
        return reason
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'mamba-jax[cuda]')"
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return "jax-triton is not installed (pip install 'mamba-jax[cuda]')"
    except Exception as err:  # a broken install raises more than ImportError
        return f"jax-triton does not import: {type(err).__name__}: {err}"
    return nvidia_gpu_reason(backend, "the Triton kernel")


# ----------------------------------------------------------------------------------------------
# Kernel launches: jax_triton on the GPU, or Triton's interpreter behind a pure_callback.


def _kernels():
    from pallas_kernels import triton_scan_kernels

    return triton_scan_kernels


@functools.cache
def _out_keyword(triton_call) -> str:
    return "out_type" if "out_type" in inspect.signature(triton_call).parameters else "out_shape"


def _launch(plan, name, grid, warps, inputs, out_shapes, scalars):
    """Runs kernel `name` with array `inputs` (in order), outputs `out_shapes` (appended after
    them) and keyword `scalars` (sizes and constexprs)."""
    kernel = getattr(_kernels(), name)
    if not plan.interpret:
        import jax_triton as jt

        # jax-triton 0.3 names the outputs' shapes out_shape; 0.4 renamed it out_type.
        outs = {_out_keyword(jt.triton_call): out_shapes}
        return jt.triton_call(
            *inputs,
            kernel=kernel,
            **outs,
            grid=grid,
            num_warps=warps,
            num_stages=plan.num_stages,
            **scalars,
        )

    if type(kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            "interpret=True needs TRITON_INTERPRET=1 in the environment before triton is first "
            "imported"
        )

    _interpreter_numpy_compat()

    def host(*arrays):
        outs = [np.zeros(s.shape, s.dtype) for s in out_shapes]
        args = [_HostTensor(np.asarray(a)) for a in arrays] + [_HostTensor(o) for o in outs]
        # XLA may run independent callbacks (the forward and the backward's split pass) on two
        # threads at once, and Triton's interpreter patches global state while it runs.
        with _INTERPRETER_LOCK:
            kernel[grid](*args, **scalars)
        return tuple(o.array for o in args[len(arrays) :])

    return list(jax.pure_callback(host, tuple(out_shapes), *inputs))


_INTERPRETER_LOCK = threading.Lock()


def _interpreter_numpy_compat():
    """Triton 3.6's interpreter turns its scalars (shape (1,) arrays) into loop bounds with
    int(array), which NumPy >= 2.5 refuses; take the one element instead."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_scan_compat", False):
        return

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch._scan_compat = True
    interpreter._patch_lang_tensor = patch


class _HostStorage:
    def __init__(self, array):
        self.array = array

    def data_ptr(self):
        return self.array.ctypes.data

    def cpu(self):
        return self

    def copy_(self, other):
        pass


class _HostDtype:
    def __init__(self, dtype):
        self.name = np.dtype(dtype).name

    def __str__(self):
        return f"torch.{self.name}"


class _HostTensor:
    """The few torch.Tensor methods Triton's interpreter uses, over a contiguous numpy array that
    the interpreter then reads and writes in place."""

    def __init__(self, array):
        self.array = np.ascontiguousarray(array)

    @property
    def dtype(self):
        return _HostDtype(self.array.dtype)

    def data_ptr(self):
        return self.array.ctypes.data

    def untyped_storage(self):
        return _HostStorage(self.array)

    def new_empty(self, *args, **kwargs):
        return _HostTensor(np.empty(0, self.array.dtype))

    def set_(self, storage, offset, size, stride):
        self.array = storage.array
        return self

    def storage_offset(self):
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)

    def copy_(self, other):
        pass


# ----------------------------------------------------------------------------------------------
# Forward and backward.


def _sizes(plan, channels, chunks_per_split, fwd):
    p = plan.group_size
    k = plan.fwd_chunk if fwd else plan.chunk
    nc = plan.fwd_chunks if fwd else plan.n_chunks
    return dict(
        L=plan.length,
        E=plan.e,
        G=plan.groups,
        P=p,
        NB=plan.blocks_per_group(channels),
        NC=nc,
        CPS=chunks_per_split,
        NSPLIT=plan.n_splits(chunks_per_split, fwd),
        BE=channels,
        NP=plan.n_pad,
        K=k,
        BC=plan.bc_mode,
    )


def _unroll(splits):
    """The chain between splits unrolled (XLA fuses it; a while loop pays a launch and a
    host round trip per split), in pieces of 8 beyond 64 splits to bound compile time."""
    return True if splits <= 64 else 8


def _chain_forward(p, s, h0):
    """p, s: (b, splits, NP, e): the start state of every split from h0, split k ending at
    p[k] h + s[k]."""

    def step(h, ps):
        return ps[0] * h + ps[1], h

    _, starts = jax.lax.scan(
        step, h0, (jnp.moveaxis(p, 1, 0), jnp.moveaxis(s, 1, 0)), unroll=_unroll(p.shape[1])
    )
    return jnp.moveaxis(starts, 0, 1)


def _chain_backward(p, q, gh):
    """p, q: (b, splits, NP, e): the carry into every split's last token, the last split's being
    gh, and the carry out of split k's first token being p[k] carry_in + q[k]."""

    def step(carry_in, pq):
        return pq[0] * carry_in + pq[1], carry_in

    _, ins = jax.lax.scan(step, gh, (jnp.moveaxis(p, 1, 0), jnp.moveaxis(q, 1, 0)), reverse=True,
                          unroll=_unroll(p.shape[1]))  # fmt: skip
    return jnp.moveaxis(ins, 0, 1)


def _state_in(plan, x):
    """(b, e, n) -> (b, NP, e) fp32, zero-padded state entries."""
    x = jnp.swapaxes(x.astype(jnp.float32), 1, 2)
    return jnp.pad(x, ((0, 0), (0, plan.n_pad - plan.n), (0, 0)))


def _state_out(plan, x):
    """(..., NP, e) -> (..., e, n)."""
    return jnp.swapaxes(x[..., : plan.n, :], -1, -2)


def _bc_words(plan, x):
    """(b, l, g, n) -> (b, l, g, words) uint32: the row padded to NP, as fp32 words or packed
    bf16 pairs (the kernels read one row with NP or NP / 2 word loads)."""
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, plan.n_pad - plan.n)))
    if plan.bc_mode == 0:
        return jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    x = x.astype(jnp.bfloat16).reshape(*x.shape[:-1], plan.n_pad // 2, 2)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _a_scaled(plan, A):
    """A (e, n) -> A log2(e) as (NP, e), zero-padded."""
    return _state_in(plan, (A * LOG2E)[None])[0]


# Under jax.jit (static: the plan, save): a model with unrolled layers traces and lowers each
# kernel once, as in pallas_kernels/__init__.py.
@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("save",))
def _forward(plan, u, delta, z, B, C, A, D, bias, h0, rst, save):
    b, e, np_ = plan.batch, plan.e, plan.n_pad
    f32 = jnp.float32
    sc = _sizes(plan, plan.fwd_channels, plan.fwd_split, fwd=True)
    flags = dict(HAS_SEG=plan.has_seg, SOFTPLUS=plan.softplus)
    nsplit = sc["NSPLIT"]
    grid = (plan.groups * sc["NB"], nsplit, b)
    Bw, Cw, A2 = _bc_words(plan, B), _bc_words(plan, C), _a_scaled(plan, A)
    split_shape = jax.ShapeDtypeStruct((b, nsplit, np_, e), f32)
    h0 = _state_in(plan, h0)
    if nsplit > 1:
        p, s = _launch(plan, "_fwd_local_kernel", grid, plan.fwd_warps,
                       [u, delta, Bw, A2, bias, rst], [split_shape, split_shape],
                       {**sc, **flags})  # fmt: skip
        starts = _chain_forward(p, s, h0)
    else:
        starts = h0[:, None]
    ckpt_shape = (b, plan.n_ckpt, np_, e) if save else (1,)
    outs = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        split_shape,
        jax.ShapeDtypeStruct(ckpt_shape, f32),
    ]
    y, h_end, ckpt = _launch(
        plan, "_fwd_kernel", grid, plan.fwd_warps,
        [u, delta, z, Bw, Cw, A2, D, bias, rst, starts], outs,
        {**sc, **flags, "HAS_Z": plan.has_z, "SAVE": bool(save), "CK": plan.chunk,
         "NCK": plan.n_ckpt},
    )  # fmt: skip
    return y, _state_out(plan, h_end[:, -1]), ckpt


@functools.partial(jax.jit, static_argnums=0)
def _backward(plan, res, gy, gh):
    u, delta, z, B, C, A, D, bias, rst, ckpt = res
    b, length, e, n, g, np_ = plan.batch, plan.length, plan.e, plan.n, plan.groups, plan.n_pad
    f32 = jnp.float32
    sc = _sizes(plan, plan.bwd_channels, plan.bwd_split, fwd=False)
    flags = dict(HAS_SEG=plan.has_seg, SOFTPLUS=plan.softplus, HAS_Z=plan.has_z)
    nsplit, nb = sc["NSPLIT"], sc["NB"]
    grid = (g * nb, nsplit, b)
    Bw, Cw, A2 = _bc_words(plan, B), _bc_words(plan, C), _a_scaled(plan, A)
    split_shape = jax.ShapeDtypeStruct((b, nsplit, np_, e), f32)
    gh = _state_in(plan, gh)
    if nsplit > 1:
        p, q = _launch(plan, "_bwd_local_kernel", grid, plan.bwd_warps,
                       [delta, z, gy, Cw, A2, bias, rst], [split_shape, split_shape],
                       {**sc, **flags})  # fmt: skip
        carry_in = _chain_backward(p, q, gh)
    else:
        carry_in = gh[:, None]
    blocks = g * nb * (plan.bwd_channels // plan.bwd_sum_lanes)  # dB / dC partials per group
    outs = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct(delta.shape, delta.dtype),
        jax.ShapeDtypeStruct(z.shape if plan.has_z else (1,), z.dtype),
        jax.ShapeDtypeStruct((blocks, b, length, np_), f32),
        jax.ShapeDtypeStruct((blocks, b, length, np_), f32),
        split_shape,
        jax.ShapeDtypeStruct((b, nsplit, e), f32),
        jax.ShapeDtypeStruct((b, nsplit, e), f32),
        split_shape,
    ]
    du, ddelta, dz, dB, dC, dA, dD, dbias, carry0 = _launch(
        plan, "_bwd_kernel", grid, plan.bwd_warps,
        [u, delta, z, gy, Bw, Cw, A2, D, bias, rst, ckpt, carry_in], outs,
        {**sc, **flags, "BATCH": b, "NCK": plan.n_ckpt, "SUM_LANES": plan.bwd_sum_lanes,
         "SCATTER": plan.bwd_scatter},
    )  # fmt: skip
    # Partial sums -> gradients (fixed order: deterministic).
    dB = dB.reshape(g, -1, b, length, np_).sum(axis=1).transpose(1, 2, 0, 3)[..., :n]
    dC = dC.reshape(g, -1, b, length, np_).sum(axis=1).transpose(1, 2, 0, 3)[..., :n]
    dA = _state_out(plan, dA.sum(axis=(0, 1)))
    dD = dD.sum(axis=(0, 1))
    dbias = dbias.sum(axis=(0, 1))
    # d h0 is the carry out of the first token (a segment never starts at position 0).
    dh0 = _state_out(plan, carry0[:, 0])
    dz = dz if plan.has_z else jnp.zeros_like(z)
    return du, ddelta, dz, dB, dC, dA, dD, dbias, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan, u, delta, z, B, C, A, D, bias, h0, rst):
    y, h, _ = _forward(plan, u, delta, z, B, C, A, D, bias, h0, rst, save=False)
    return y, h


def _scan_fwd(plan, u, delta, z, B, C, A, D, bias, h0, rst):
    y, h, ckpt = _forward(plan, u, delta, z, B, C, A, D, bias, h0, rst, save=True)
    # As in the Hopper kernel's forward (pallas_kernels/__init__.py): keeps XLA's dynamic-slice
    # fusion from cloning the kernel call when a layer scan stacks its outputs.
    y, h, ckpt = jax.lax.optimization_barrier((y, h, ckpt))
    return (y, h), (u, delta, z, B, C, A, D, bias, rst, name_checkpoints(ckpt))


def _scan_bwd(plan, res, cotangents):
    gy, gh = cotangents
    du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = _backward(plan, res, gy, gh.astype(jnp.float32))
    B, C, rst = res[3], res[4], res[8]
    return (du, ddelta, dz, dB.astype(B.dtype), dC.astype(C.dtype), dA, dD, dbias, dh0,
            jnp.zeros_like(rst))  # fmt: skip


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, *,
                          delta_softplus=False, initial_state=None, segment_ids=None,
                          block_sizes=None, interpret=False):  # fmt: skip
    """The selective scan as fused Triton kernels (NVIDIA GPUs, compute capability >= 7.5).

    u, delta, z: (b, l, e) float32/bfloat16/float16; A: (e, n); B, C: (b, l, n) or
    (b, l, g, n) with g dividing e; D, delta_bias: (e,) or None; initial_state: (b, e, n) or None
    (zeros); segment_ids: (b, l) int or None (the state restarts from zero where the id differs
    from the previous position's; the initial state feeds the first segment).
    Returns (y (b, l, e) in u.dtype, final_state (b, e, n) float32). Differentiable (custom_vjp)
    in every float argument and through final_state; gradients are bitwise deterministic.
    block_sizes: TritonBlockSizes or None (defaults). interpret=True runs the kernels in Triton's
    interpreter on CPU (tests only)."""
    b, length, e, n, g = validate_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if segment_ids is not None:
        validate_segment_ids(segment_ids, b, length)
    if block_sizes is not None and not isinstance(block_sizes, TritonBlockSizes):
        raise ValueError(
            f"block_sizes must be a TritonBlockSizes, got {type(block_sizes).__name__}"
        )
    if interpret:
        reason = size_reason(batch=b, length=length, d=e, n=n, groups=g, dtype=u.dtype,
                             max_d_state=MAX_D_STATE)  # fmt: skip
    else:
        reason = triton_unsupported_reason(
            batch=b, length=length, d=e, n=n, groups=g, dtype=u.dtype
        )
    if reason is not None:
        raise ValueError(f"selective_scan_triton cannot run this call: {reason}")
    plan = make_plan(b, length, e, n, g, block_sizes or TritonBlockSizes(),
                     softplus=delta_softplus, has_z=z is not None,
                     has_seg=segment_ids is not None, interpret=interpret,
                     bc_dtypes=(B.dtype, C.dtype),
                     num_sms=NUM_SMS if interpret else _num_sms())  # fmt: skip
    f32 = jnp.float32
    Bg = B if B.ndim == 4 else B[:, :, None, :]
    Cg = C if C.ndim == 4 else C[:, :, None, :]
    # The state and its parameters are fp32 inside; the casts outside the custom_vjp hand their
    # cotangents back in the caller's dtypes.
    A = A.astype(f32)
    D = jnp.zeros((e,), f32) if D is None else D.astype(f32)
    bias = jnp.zeros((e,), f32) if delta_bias is None else delta_bias.astype(f32)
    h0 = jnp.zeros((b, e, n), f32) if initial_state is None else initial_state.astype(f32)
    z_arg = z if z is not None else jnp.zeros((1,), u.dtype)
    if segment_ids is None:
        rst = jnp.zeros((1,), f32)
    else:
        # The decay's exponent offset: -inf where a segment starts (exp2 gives 0), else 0.
        start = segment_ids[:, 1:] != segment_ids[:, :-1]
        start = jnp.concatenate([jnp.zeros((b, 1), bool), start], axis=1)
        rst = jnp.where(start, -jnp.inf, 0.0).astype(f32)
    return _scan(plan, u, delta, z_arg, Bg, Cg, A, D, bias, h0, rst)
