"""The selective scan (the paper's S6, Algorithm 2) and its implementations.

Glossary (paper symbol -> argument):
    u      x_t, the input                           (b, l, e)
    delta  Δ, the step size before bias/softplus     (b, l, e)
    A      A, the diagonal state matrix (negative)   (e, n)
    B, C   B_t, C_t, input-dependent projections      (b, l, n) or (b, l, g, n)
    D      the skip connection                       (e,)
    z      the gate branch; out = y * silu(z)        (b, l, e)
    h      the state                                 (b, e, n), always float32

Recurrence (zero-order hold for A, the simplified Euler form for B, paper eq. 4 and section 3.5):
    Δ'  = softplus(delta + delta_bias) or delta + delta_bias
    h_t = exp(Δ'_t A) h_{t-1} + Δ'_t u_t B_t
    y_t = h_t · C_t + D u_t,  out_t = y_t silu(z_t)

Implementations:
    reference    lax.scan over time, fp32. Slow but obviously right; everything is tested against it.
    associative  lax.associative_scan inside fixed-size chunks, lax.scan across chunks. A custom_vjp keeps
                 only the inputs and the chunk-boundary states for the backward, which recomputes each
                 chunk's states and runs the adjoint recurrence as a reverse associative scan, so no
                 (b, l, e, n) tensor outlives one chunk.
    pallas       the fused kernels in `pallas_kernels`: Mosaic GPU on Hopper, Mosaic TPU on a TPU
                 backend (the TPU one verified in interpret mode and by lowering only).
    triton       the fused Triton kernel (`pallas_kernels.triton_scan`, through jax-triton, the
                 `cuda` extra) for NVIDIA GPUs of compute capability 7.5 and up.
    auto         pallas where `pallas_kernels.supported(...)` says so (a Hopper GPU or a TPU
                 backend), else triton where it can run (an NVIDIA GPU with the `cuda` extra
                 installed), else associative.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mamba_jax import scan_sharding

IMPLS = ("auto", "reference", "associative", "pallas", "triton")
_FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
DEFAULT_CHUNK = 128


def _check_float(name, x, allowed=_FLOAT_DTYPES):
    if not any(x.dtype == jnp.dtype(t) for t in allowed):
        names = ", ".join(jnp.dtype(t).name for t in allowed)
        raise ValueError(f"{name} must have dtype in ({names}), got {x.dtype}")


def _check_shape(name, x, expected, meaning):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {meaning}={tuple(expected)}, got {tuple(x.shape)}"
        )


def _validate(u, delta, A, B, C, D, z, delta_bias, initial_state):
    """Checks every argument; returns (b, l, e, n, g)."""
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise ValueError(f"{name} must be an array, got {type(x).__name__}")
    if u.ndim != 3:
        raise ValueError(f"u must have shape (b, l, e), got rank {u.ndim} shape {tuple(u.shape)}")
    bsz, length, e = u.shape
    _check_float("u", u)
    _check_shape("delta", delta, (bsz, length, e), "(b, l, e)")
    _check_float("delta", delta)
    if A.ndim != 2 or A.shape[0] != e:
        raise ValueError(f"A must have shape (e, n) with e={e}, got {tuple(A.shape)}")
    _check_float("A", A)
    n = A.shape[1]
    if B.ndim not in (3, 4):
        raise ValueError(f"B must have shape (b, l, n) or (b, l, g, n), got {tuple(B.shape)}")
    g = 1 if B.ndim == 3 else B.shape[2]
    expected_bc = (bsz, length, n) if B.ndim == 3 else (bsz, length, g, n)
    meaning = "(b, l, n)" if B.ndim == 3 else "(b, l, g, n)"
    _check_shape("B", B, expected_bc, meaning)
    _check_shape("C", C, expected_bc, meaning)
    _check_float("B", B)
    _check_float("C", C)
    if g < 1 or e % g:
        raise ValueError(f"groups g={g} of B/C must divide e={e}")
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _check_shape(name, x, (e,), "(e,)")
            _check_float(name, x)
    if z is not None:
        _check_shape("z", z, (bsz, length, e), "(b, l, e)")
        _check_float("z", z)
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (bsz, e, n), "(b, e, n)")
        _check_float("initial_state", initial_state)
    return bsz, length, e, n, g


def segment_keep(segment_ids, shape):
    """segment_ids (b, l) int -> keep (b, l) float32: 0 where a new segment starts (the id differs
    from the previous position's), 1 elsewhere, and 1 at position 0 (the initial state, zeros by
    default, enters the first segment)."""
    if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != tuple(shape):
        got = tuple(getattr(segment_ids, "shape", ()))
        raise ValueError(f"segment_ids must have shape (b, l)={tuple(shape)}, got {got}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
    same = segment_ids[:, 1:] == segment_ids[:, :-1]  # (b, l - 1)
    first = jnp.ones((shape[0], 1), bool)
    return jnp.concatenate([first, same], axis=1).astype(jnp.float32)


def segment_ids_from_positions(position_ids):
    """position_ids (b, l) int that restart at 0 for each packed document -> segment ids (b, l):
    a new segment begins wherever the position is 0."""
    if not hasattr(position_ids, "ndim") or position_ids.ndim != 2:
        raise ValueError(
            f"position_ids must have shape (b, l), got {getattr(position_ids, 'shape', None)}"
        )
    if not jnp.issubdtype(position_ids.dtype, jnp.integer):
        raise ValueError(f"position_ids must be integers, got {position_ids.dtype}")
    return jnp.cumsum(position_ids == 0, axis=1, dtype=jnp.int32)


def _as_groups(B):
    return B[:, :, None, :] if B.ndim == 3 else B  # (b, l, g, n)


def _step_size(delta, delta_bias, delta_softplus):
    """Δ' = softplus(delta + delta_bias) (or without the softplus), fp32 (b, l, e)."""
    dt = delta.astype(jnp.float32)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(jnp.float32)
    if delta_softplus:
        # Matches mamba_ssm: softplus(x) = x above 20, where log1p(exp(x)) == x in fp32 anyway.
        dt = jnp.where(dt > 20.0, dt, jax.nn.softplus(dt))
    return dt  # (b, l, e)


def _output(y, u, D, z, out_dtype):
    """y: (b, l, e) fp32 scan output -> D skip and z gate, cast to the input dtype."""
    if D is not None:
        y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y.astype(out_dtype)


# ----------------------------------------------------------------------------------------------
# The sequential reference.


def _recurrence_step(h, u, dt, A, B, C, keep=None):
    """One step of the recurrence, shared by the reference scan and decoding.

    h: (b, e, n) f32; u, dt: (b, e) f32; A: (e, n) f32; B, C: (b, g, n) f32; keep: (b,) f32 or
    None, 0 where a new segment starts (the state restarts from zero there).
    Returns (h_t (b, e, n), y_t (b, e) without the D skip and the gate)."""
    p = u.shape[1] // B.shape[1]
    Bx = jnp.repeat(B, p, axis=1)  # (b, e, n)
    Cx = jnp.repeat(C, p, axis=1)  # (b, e, n)
    decay = jnp.exp(dt[..., None] * A)  # (b, e, n)
    if keep is not None:
        decay = decay * keep[:, None, None]
    h = decay * h + (dt * u)[..., None] * Bx
    return h, jnp.sum(h * Cx, axis=-1)


def _ssm_reference(u, dt, A, B, C, h0, keep):
    """u, dt: (b, l, e) f32; A: (e, n); B, C: (b, l, g, n); h0: (b, e, n); keep: (b, l) f32.
    Returns y (b, l, e), h_L."""

    def step(h, xs):
        return _recurrence_step(h, xs[0], xs[1], A, xs[2], xs[3], xs[4])

    xs = jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), (u, dt, B, C, keep))
    h, y = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(y, 0, 1), h


# ----------------------------------------------------------------------------------------------
# The chunked associative scan with a recomputing backward.
# Inside a chunk, arrays are laid out (b, t, g, p, n) with e = g * p, so grouped B/C broadcast
# over p without being repeated to (b, t, e, n).


def _combine(left, right):
    """Composes two affine maps h -> a h + b; `left` comes first in time."""
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _chunk_states(u, dt, A, B, h0, keep):
    """States of one chunk. u, dt: (b, t, g, p); A: (g, p, n); B: (b, t, g, n); h0: (b, g, p, n);
    keep: (b, t), 0 where a new segment starts.

    Returns (h (b, t, g, p, n), decay a (b, t, g, p, n))."""
    a = jnp.exp(dt[..., None] * A) * keep[:, :, None, None, None]  # (b, t, g, p, n)
    bx = (dt * u)[..., None] * B[:, :, :, None, :]  # (b, t, g, p, n)
    a_cum, b_cum = jax.lax.associative_scan(_combine, (a, bx), axis=1)
    return a_cum * h0[:, None] + b_cum, a


def _split_chunks(x, nc, t):
    """(b, nc * t, ...) -> (nc, b, t, ...) so lax.scan walks the chunks."""
    return jnp.moveaxis(x.reshape(x.shape[0], nc, t, *x.shape[2:]), 1, 0)


def _merge_chunks(x):
    """(nc, b, t, ...) -> (b, nc * t, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _to_groups(u, dt, A, B, C, h0):
    bsz, length, e = u.shape
    g = B.shape[2]
    p = e // g
    return (
        u.reshape(bsz, length, g, p),
        dt.reshape(bsz, length, g, p),
        A.reshape(g, p, -1),
        B,
        C,
        h0.reshape(bsz, g, p, -1),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _ssm_chunked(u, dt, A, B, C, h0, keep, chunk):
    y, h, _ = _ssm_chunked_fwd_impl(u, dt, A, B, C, h0, keep, chunk)
    return y, h


def _ssm_chunked_fwd_impl(u, dt, A, B, C, h0, keep, chunk):
    """u, dt: (b, L, e) f32 with L % chunk == 0; B, C: (b, L, g, n) f32; h0: (b, e, n);
    keep: (b, L) f32."""
    bsz, length, e = u.shape
    nc = length // chunk
    ug, dtg, Ag, Bg, Cg, h0g = _to_groups(u, dt, A, B, C, h0)

    def body(h_start, xs):
        u_c, dt_c, B_c, C_c, keep_c = xs
        h, _ = _chunk_states(u_c, dt_c, Ag, B_c, h_start, keep_c)  # (b, t, g, p, n)
        y = jnp.einsum("btgpn,btgn->btgp", h, C_c)
        return h[:, -1], (y, h_start)

    xs = tuple(_split_chunks(x, nc, chunk) for x in (ug, dtg, Bg, Cg, keep))
    h_last, (y, h_starts) = jax.lax.scan(body, h0g, xs)
    y = _merge_chunks(y).reshape(bsz, length, e)
    return y, h_last.reshape(bsz, e, -1), h_starts  # h_starts: (nc, b, g, p, n)


def _ssm_chunked_fwd(u, dt, A, B, C, h0, keep, chunk):
    y, h, h_starts = _ssm_chunked_fwd_impl(u, dt, A, B, C, h0, keep, chunk)
    return (y, h), (u, dt, A, B, C, keep, h_starts)


def _ssm_chunked_bwd(chunk, res, cotangents):
    u, dt, A, B, C, keep, h_starts = res
    gy, gh_final = cotangents
    bsz, length, e = u.shape
    nc = length // chunk
    ug, dtg, Ag, Bg, Cg, _ = _to_groups(u, dt, A, B, C, h_starts[0].reshape(bsz, e, -1))
    g, p = ug.shape[2], ug.shape[3]
    gyg = gy.reshape(bsz, length, g, p)

    def body(carry, xs):
        # carry: dL/dh at the end of this chunk coming from later chunks (or the final-state cotangent).
        gh_next, gA = carry
        u_c, dt_c, B_c, C_c, keep_c, gy_c, h_start = xs
        h, a = _chunk_states(u_c, dt_c, Ag, B_c, h_start, keep_c)  # (b, t, g, p, n)
        # Adjoint recurrence, run backwards in time: lam_t = gy_t C_t + a_{t+1} lam_{t+1}.
        r = gy_c[..., None] * C_c[:, :, :, None, :]  # (b, t, g, p, n)
        r = r.at[:, -1].add(gh_next)
        a_next = jnp.concatenate([a[:, 1:], jnp.ones_like(a[:, :1])], axis=1)
        _, lam = jax.lax.associative_scan(_combine, (a_next, r), axis=1, reverse=True)
        h_prev = jnp.concatenate([h_start[:, None], h[:, :-1]], axis=1)  # (b, t, g, p, n)
        gC = jnp.einsum("btgp,btgpn->btgn", gy_c, h)
        gB = jnp.einsum("btgp,btgpn->btgn", dt_c * u_c, lam)
        s = jnp.einsum("btgpn,btgn->btgp", lam, B_c)  # dL/d(dt u)
        g_da = lam * h_prev * a  # dL/d(dt A), (b, t, g, p, n)
        g_dt = u_c * s + jnp.einsum("btgpn,gpn->btgp", g_da, Ag)
        g_u = dt_c * s
        gA = gA + jnp.einsum("btgpn,btgp->gpn", g_da, dt_c)
        gh_start = a[:, 0] * lam[:, 0]
        return (gh_start, gA), (g_u, g_dt, gB, gC)

    xs = tuple(_split_chunks(x, nc, chunk) for x in (ug, dtg, Bg, Cg, keep, gyg)) + (h_starts,)
    init = (gh_final.reshape(bsz, g, p, -1), jnp.zeros_like(Ag))
    (gh0, gA), (g_u, g_dt, gB, gC) = jax.lax.scan(body, init, xs, reverse=True)
    g_u = _merge_chunks(g_u).reshape(bsz, length, e)
    g_dt = _merge_chunks(g_dt).reshape(bsz, length, e)
    return (
        g_u,
        g_dt,
        gA.reshape(e, -1),
        _merge_chunks(gB),
        _merge_chunks(gC),
        gh0.reshape(bsz, e, -1),
        jnp.zeros_like(keep),  # segment boundaries are data, not parameters
    )


_ssm_chunked.defvjp(_ssm_chunked_fwd, _ssm_chunked_bwd)


def _ssm_associative(u, dt, A, B, C, h0, keep, chunk=None):
    """Pads L up to a multiple of the chunk with dt = 0 (an identity step) and runs the chunked scan."""
    length = u.shape[1]
    chunk = max(1, min(chunk or DEFAULT_CHUNK, length))
    pad = (-length) % chunk
    if pad:
        widths = lambda x: [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        u, dt, B, C = (jnp.pad(x, widths(x)) for x in (u, dt, B, C))
        keep = jnp.pad(keep, widths(keep), constant_values=1.0)
    y, h = _ssm_chunked(u, dt, A, B, C, h0, keep, chunk)
    return y[:, :length], h


# ----------------------------------------------------------------------------------------------
# The public dispatcher.


def resolve_impl(impl, bsz, length, e, n, g, dtype) -> str:
    """The implementation `impl` runs as for these sizes: "reference", "associative", "pallas"
    or "triton" ("auto" picks pallas where that kernel supports the call here, else triton where
    it can run, else associative). Raises ValueError for an unknown impl, or for impl="pallas"
    or "triton" where that kernel cannot run the call."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("reference", "associative"):
        return impl
    import pallas_kernels
    from pallas_kernels.triton_scan import triton_unsupported_reason

    sizes = dict(batch=bsz, length=length, d=e, n=n, groups=g, dtype=dtype)
    if impl == "triton":
        reason = triton_unsupported_reason(**sizes)
        if reason is not None:
            raise ValueError(f"impl='triton' is not supported for this call: {reason}")
        return "triton"

    query = getattr(pallas_kernels, "unsupported_reason", None)
    reason = (
        "this build of pallas_kernels has no selective-scan kernel"
        if query is None
        else query(batch=bsz, length=length, d=e, n=n, groups=g, dtype=dtype)
    )
    if impl == "pallas":
        if reason is not None:
            raise ValueError(f"impl='pallas' is not supported for this call: {reason}")
        return "pallas"
    if reason is None:
        return "pallas"
    return "triton" if triton_unsupported_reason(**sizes) is None else "associative"


def selective_scan(
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
    return_final_state=False,
    segment_ids=None,
    impl="auto",
):
    """The selective scan of Mamba (paper Algorithm 2), channels-last.

    Args:
      u, delta: (b, l, e) float32/bfloat16/float16.
      A: (e, n), normally negative (A = -exp(A_log)).
      B, C: (b, l, n), shared by all channels, or (b, l, g, n) with g dividing e.
      D, delta_bias: (e,) or None.
      z: (b, l, e) or None; when given the output is gated by silu(z).
      delta_softplus: apply softplus to delta + delta_bias.
      initial_state: (b, e, n) or None (zeros).
      return_final_state: also return h_L, (b, e, n) float32.
      segment_ids: (b, l) int or None. Packed documents: where the id changes from one position
        to the next, the state restarts from zero (the decay is multiplied by 0 there), so no
        state flows from one segment into the next. The initial state feeds the first segment.
      impl: "reference", "associative", "pallas", "triton" or "auto".

    Returns:
      y: (b, l, e) in u's dtype, or (y, final_state) when return_final_state.
    """
    bsz, length, e, n, g = _validate(u, delta, A, B, C, D, z, delta_bias, initial_state)
    keep = None if segment_ids is None else segment_keep(segment_ids, (bsz, length))
    impl = resolve_impl(impl, bsz, length, e, n, g, u.dtype)
    layout = scan_sharding.scan_layout(bsz, length, e, g)
    if layout is not None:
        # Under a mesh every device scans its own block inside shard_map (scan_sharding.py):
        # this function runs again there, on the block, where the mesh axes are manual.
        b_, l_, e_, g_ = scan_sharding.local_sizes(layout, bsz, length, e, g)
        if impl in ("pallas", "triton"):
            try:
                resolve_impl(impl, b_, l_, e_, n, g_, u.dtype)
            except ValueError as err:
                msg = f"selective_scan: one device's block: {err}; it runs the associative scan"
                scan_sharding.log_once(msg)
                impl = "associative"
        block = functools.partial(
            selective_scan, delta_softplus=delta_softplus, return_final_state=True, impl=impl
        )
        step_size = functools.partial(_step_size, delta_softplus=delta_softplus)
        args = (u, delta, A, B, C, D, z, delta_bias, initial_state, segment_ids)
        y, h = scan_sharding.sharded_scan(block, step_size, layout, keep, *args)
        return (y, h) if return_final_state else y
    if impl == "pallas":
        import pallas_kernels

        y, h = pallas_kernels.selective_scan_pallas(
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
        )
        return (y, h) if return_final_state else y
    if impl == "triton":
        from pallas_kernels.triton_scan import selective_scan_triton

        y, h = selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=delta_softplus,
            initial_state=initial_state, segment_ids=segment_ids,
        )  # fmt: skip
        return (y, h) if return_final_state else y

    dt = _step_size(delta, delta_bias, delta_softplus)
    h0 = (
        jnp.zeros((bsz, e, n), jnp.float32)
        if initial_state is None
        else initial_state.astype(jnp.float32)
    )
    Bg, Cg = _as_groups(B).astype(jnp.float32), _as_groups(C).astype(jnp.float32)
    keep = jnp.ones((bsz, length), jnp.float32) if keep is None else keep
    args = (u.astype(jnp.float32), dt, A.astype(jnp.float32), Bg, Cg, h0, keep)
    y, h = _ssm_reference(*args) if impl == "reference" else _ssm_associative(*args)
    y = _output(y, u, D, z, u.dtype)
    return (y, h) if return_final_state else y


def selective_scan_step(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, *, state, delta_softplus=False
):
    """One recurrent step for decoding: the reference scan's step on one token.

    u, delta, z: (b, e); B, C: (b, n) or (b, g, n); state: (b, e, n) f32. Returns (y (b, e), new state).
    """
    dt = _step_size(delta, delta_bias, delta_softplus)  # (b, e)
    Bg = (B[:, None, :] if B.ndim == 2 else B).astype(jnp.float32)  # (b, g, n)
    Cg = (C[:, None, :] if C.ndim == 2 else C).astype(jnp.float32)
    h, y = _recurrence_step(state, u.astype(jnp.float32), dt, A.astype(jnp.float32), Bg, Cg)
    return _output(y, u, D, z, u.dtype), h
