"""A fused selective scan in Triton for NVIDIA GPUs before Hopper (A100, L4, RTX), called from JAX
through jax-triton.

    y, final_state = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias,
                                           delta_softplus=True, initial_state=None,
                                           segment_ids=None)

Semantics are mamba_jax.scan.selective_scan's. The kernels live in `triton_scan_kernels.py`;
this module pads nothing in HBM, picks block sizes, splits long sequences across programs (the
per-split maps are chained in JAX, a tiny (b, splits, e, n) scan), and wires the custom_vjp.

Forward: one program per (channel block, sequence split, batch row) walks its tokens in chunks
of T, scanning each chunk with `tl.associative_scan`; under differentiation it also stores the
state before every chunk, (b, L / T, e, n) fp32, the only state tensor that reaches HBM.
Backward: each program walks its chunks in reverse, recomputes a chunk's states from its
checkpoint and runs the adjoint recurrence as a reverse associative scan. dB and dC are written
as partial sums per channel block, dA, dD and d_delta_bias as partial sums per program; JAX adds
them up, so the gradients are bitwise deterministic (no atomics).

Triton and jax_triton are imported only when a kernel runs, so importing this module needs
neither. `interpret=True` runs the same kernels in Triton's interpreter on CPU through
`jax.pure_callback` (needs triton and TRITON_INTERPRET=1 set before triton is first imported;
jax_triton is not needed): slow, for tests at tiny sizes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._validation import size_reason, validate_scan_args, validate_segment_ids

__all__ = ["TritonBlockSizes", "selective_scan_triton", "triton_unsupported_reason"]

MAX_D_STATE = 256
MIN_COMPUTE_CAPABILITY = (7, 5)


def _pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class TritonBlockSizes:
    """Tile sizes of the Triton kernels (all optional; None picks a default from n).

    chunk: tokens per chunk T (a power of two; the forward and backward share it).
    fwd_channels, bwd_channels: channels per program (powers of two).
    fwd_tile, bwd_tile: when the channel counts are None, the budget of T * channels * n_pad
      elements per state tile that sets them.
    fwd_warps, bwd_warps: warps per program.
    min_programs: below this many programs (batch x channel blocks) the sequence is split
      across programs (each split costs one extra pass over its tokens).
    min_split_chunks: a split is never shorter than this many chunks.
    """

    chunk: int | None = None
    fwd_channels: int | None = None
    bwd_channels: int | None = None
    fwd_tile: int = 4096
    bwd_tile: int = 4096
    fwd_warps: int = 4
    bwd_warps: int = 8
    num_stages: int = 1
    min_programs: int = 256
    min_split_chunks: int = 8

    def __post_init__(self):
        for name in ("chunk", "fwd_channels", "bwd_channels"):
            v = getattr(self, name)
            if v is not None and (v < 2 or v & (v - 1)):
                raise ValueError(f"{name} must be a power of two >= 2, got {v}")
        for name in ("fwd_warps", "bwd_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes of one call (hashable: it is the custom_vjp's static argument)."""

    batch: int
    length: int
    e: int
    n: int
    groups: int
    n_pad: int
    chunk: int
    n_chunks: int
    fwd_channels: int
    bwd_channels: int
    fwd_split: int  # chunks per split in the forward
    bwd_split: int  # chunks per split in the backward
    fwd_warps: int
    bwd_warps: int
    num_stages: int
    softplus: bool
    has_z: bool
    has_seg: bool
    interpret: bool

    @property
    def group_size(self):
        return self.e // self.groups

    def blocks_per_group(self, channels):
        return -(-self.group_size // channels)

    def n_splits(self, chunks_per_split):
        return -(-self.n_chunks // chunks_per_split)


def _chunks_per_split(programs, n_chunks, bs):
    """Split the sequence only when the programs cannot fill the GPU."""
    if programs >= bs.min_programs:
        return n_chunks
    splits = min(-(-bs.min_programs // programs), max(1, n_chunks // bs.min_split_chunks))
    return -(-n_chunks // max(1, splits))


def make_plan(b, length, e, n, g, bs, *, softplus, has_z, has_seg, interpret) -> _Plan:
    n_pad = max(2, _pow2(n))
    chunk = bs.chunk or (16 if n_pad <= 32 else 8)
    n_chunks = -(-length // chunk)
    p = e // g

    def channels(explicit, tile):
        if explicit is not None:
            return explicit
        c = max(2, min(64, tile // (n_pad * chunk)))
        return max(2, min(c, _pow2(p)))

    fwd_c = channels(bs.fwd_channels, bs.fwd_tile)
    bwd_c = channels(bs.bwd_channels, bs.bwd_tile)
    fwd_programs = b * g * -(-p // fwd_c)
    bwd_programs = b * g * -(-p // bwd_c)
    return _Plan(
        batch=b,
        length=length,
        e=e,
        n=n,
        groups=g,
        n_pad=n_pad,
        chunk=chunk,
        n_chunks=n_chunks,
        fwd_channels=fwd_c,
        bwd_channels=bwd_c,
        fwd_split=_chunks_per_split(fwd_programs, n_chunks, bs),
        bwd_split=_chunks_per_split(bwd_programs, n_chunks, bs),
        fwd_warps=bs.fwd_warps,
        bwd_warps=bs.bwd_warps,
        num_stages=bs.num_stages,
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
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return f"the Triton kernel needs a GPU backend, got {backend!r}"
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError as err:
        return f"no GPU device: {err}"
    kind = getattr(device, "device_kind", "?")
    version = str(getattr(getattr(device, "client", None), "platform_version", "")).lower()
    if "rocm" in version or "hip" in version:
        return f"the Triton kernel targets NVIDIA GPUs, got {kind} ({version})"
    cap = getattr(device, "compute_capability", None)
    if cap is None:
        return f"cannot read the compute capability of {kind}"
    try:
        major_minor = tuple(int(x) for x in str(cap).split(".")[:2])
    except ValueError:
        return f"the Triton kernel targets NVIDIA GPUs, got {kind} (compute capability {cap!r})"
    if major_minor < MIN_COMPUTE_CAPABILITY:
        return f"the Triton kernel needs compute capability >= 7.5, got {kind} ({cap})"
    return None


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
        kernel[grid](*args, **scalars)
        return tuple(o.array for o in args[len(arrays) :])

    return list(jax.pure_callback(host, tuple(out_shapes), *inputs))


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


def _sizes(plan, channels, chunks_per_split):
    p = plan.group_size
    nb = plan.blocks_per_group(channels)
    return dict(
        L=plan.length,
        E=plan.e,
        N=plan.n,
        G=plan.groups,
        P=p,
        NB=nb,
        NC=plan.n_chunks,
        CPS=chunks_per_split,
        NSPLIT=plan.n_splits(chunks_per_split),
        BE=channels,
        NP=plan.n_pad,
        T=plan.chunk,
    )


def _chain_forward(p, s, h0):
    """p, s: (b, splits, e, n): the start state of every split from h0, split k ending at
    p[k] h + s[k]."""

    def step(h, ps):
        return ps[0] * h + ps[1], h

    _, starts = jax.lax.scan(step, h0, (jnp.moveaxis(p, 1, 0), jnp.moveaxis(s, 1, 0)))
    return jnp.moveaxis(starts, 0, 1)


def _chain_backward(p, q, gh):
    """p, q: (b, splits, e, n): lam after every split, the last one's being gh, and lam at
    split k's first token being p[k] lam_after + q[k]."""

    def step(lam_after, pq):
        return pq[0] * lam_after + pq[1], lam_after

    _, after = jax.lax.scan(step, gh, (jnp.moveaxis(p, 1, 0), jnp.moveaxis(q, 1, 0)), reverse=True)
    return jnp.moveaxis(after, 0, 1)


def _forward(plan, u, delta, z, B, C, A, D, bias, h0, keep, save):
    b, e, n = plan.batch, plan.e, plan.n
    f32 = jnp.float32
    sc = _sizes(plan, plan.fwd_channels, plan.fwd_split)
    flags = dict(HAS_SEG=plan.has_seg, SOFTPLUS=plan.softplus)
    nsplit = sc["NSPLIT"]
    grid = (plan.groups * sc["NB"], nsplit, b)
    split_shape = jax.ShapeDtypeStruct((b, nsplit, e, n), f32)
    if nsplit > 1:
        p, s = _launch(plan, "_fwd_local_kernel", grid, plan.fwd_warps,
                       [u, delta, B, A, bias, keep], [split_shape, split_shape], {**sc, **flags})  # fmt: skip
        starts = _chain_forward(p, s, h0)
    else:
        starts = h0[:, None]
    ckpt_shape = (b, plan.n_chunks, e, n) if save else (1,)
    outs = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        split_shape,
        jax.ShapeDtypeStruct(ckpt_shape, f32),
    ]
    y, h_end, ckpt = _launch(
        plan, "_fwd_kernel", grid, plan.fwd_warps,
        [u, delta, z, B, C, A, D, bias, keep, starts], outs,
        {**sc, **flags, "HAS_Z": plan.has_z, "SAVE": bool(save)},
    )  # fmt: skip
    return y, h_end[:, -1], ckpt


def _backward(plan, res, gy, gh):
    u, delta, z, B, C, A, D, bias, keep, ckpt = res
    b, length, e, n, g = plan.batch, plan.length, plan.e, plan.n, plan.groups
    f32 = jnp.float32
    sc = _sizes(plan, plan.bwd_channels, plan.bwd_split)
    flags = dict(HAS_SEG=plan.has_seg, SOFTPLUS=plan.softplus, HAS_Z=plan.has_z)
    nsplit, nb = sc["NSPLIT"], sc["NB"]
    grid = (g * nb, nsplit, b)
    split_shape = jax.ShapeDtypeStruct((b, nsplit, e, n), f32)
    if nsplit > 1:
        p, q = _launch(plan, "_bwd_local_kernel", grid, plan.bwd_warps,
                       [delta, z, gy, C, A, bias, keep], [split_shape, split_shape],
                       {**sc, **flags})  # fmt: skip
        lam_after = _chain_backward(p, q, gh)
    else:
        lam_after = gh[:, None]
    blocks = g * nb
    outs = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct(delta.shape, delta.dtype),
        jax.ShapeDtypeStruct(z.shape if plan.has_z else (1,), z.dtype),
        jax.ShapeDtypeStruct((blocks, b, length, n), f32),
        jax.ShapeDtypeStruct((blocks, b, length, n), f32),
        split_shape,
        jax.ShapeDtypeStruct((b, nsplit, e), f32),
        jax.ShapeDtypeStruct((b, nsplit, e), f32),
        split_shape,
    ]
    du, ddelta, dz, dB, dC, dA, dD, dbias, lam0 = _launch(
        plan, "_bwd_kernel", grid, plan.bwd_warps,
        [u, delta, z, gy, B, C, A, D, bias, keep, ckpt, lam_after], outs,
        {**sc, **flags, "BATCH": b},
    )  # fmt: skip
    # Partial sums -> gradients (fixed order: deterministic).
    dB = dB.reshape(g, nb, b, length, n).sum(axis=1).transpose(1, 2, 0, 3)  # (b, L, g, n)
    dC = dC.reshape(g, nb, b, length, n).sum(axis=1).transpose(1, 2, 0, 3)
    dA = dA.sum(axis=(0, 1))
    dD = dD.sum(axis=(0, 1))
    dbias = dbias.sum(axis=(0, 1))
    # d h0 = a_0 lam_0: the first token's decay (a segment never starts at position 0).
    x0 = delta[:, 0].astype(f32) + bias
    dt0 = jnp.where(x0 > 20.0, x0, jax.nn.softplus(x0)) if plan.softplus else x0
    dh0 = jnp.exp(dt0[..., None] * A) * lam0[:, 0]
    dz = dz if plan.has_z else jnp.zeros_like(z)
    return du, ddelta, dz, dB, dC, dA, dD, dbias, dh0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(plan, u, delta, z, B, C, A, D, bias, h0, keep):
    y, h, _ = _forward(plan, u, delta, z, B, C, A, D, bias, h0, keep, save=False)
    return y, h


def _scan_fwd(plan, u, delta, z, B, C, A, D, bias, h0, keep):
    y, h, ckpt = _forward(plan, u, delta, z, B, C, A, D, bias, h0, keep, save=True)
    return (y, h), (u, delta, z, B, C, A, D, bias, keep, ckpt)


def _scan_bwd(plan, res, cotangents):
    gy, gh = cotangents
    du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = _backward(plan, res, gy, gh.astype(jnp.float32))
    B, C, keep = res[3], res[4], res[8]
    return (du, ddelta, dz, dB.astype(B.dtype), dC.astype(C.dtype), dA, dD, dbias, dh0,
            jnp.zeros_like(keep))  # fmt: skip


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
                     has_seg=segment_ids is not None, interpret=interpret)  # fmt: skip
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
        keep = jnp.ones((1,), f32)
    else:
        same = segment_ids[:, 1:] == segment_ids[:, :-1]
        keep = jnp.concatenate([jnp.ones((b, 1), bool), same], axis=1).astype(f32)
    return _scan(plan, u, delta, z_arg, Bg, Cg, A, D, bias, h0, keep)
