"""The Mosaic TPU selective-scan kernels: forward, and the backward that recomputes from saved
tile-start states. `tpu_scan.py` pads the operands, lays them out and wires the custom_vjp.

TPU shape of the problem. A TensorCore's vector unit works on (8 sublanes, 128 lanes) fp32
registers, so the state of W channels is an (n, W) fp32 block: states on sublanes, channels on the
128 lanes. One grid step owns (batch row, W channels, T tokens); the grid is (b, e / W, L / T) with
the sequence axis "arbitrary" (sequential), and the state is carried across sequence tiles in a
VMEM scratch. Inside a step everything lives in VMEM:

    VMEM (blocks, double-buffered by the Pallas pipeline from HBM):
      u, delta, z, y / gy, du, ddelta, dz   (T, W)          tokens on sublanes, channels on lanes
      B, C (transposed outside)             (T/128, n, 128) states on sublanes, tokens on lanes
      A^T (n, W), D and delta_bias (1, W), the tile's start state (n, W)
    VMEM scratch: the carried state / adjoint (n, W); the tile's Δ', Δ'u, (gy silu(z)) (T, W);
      the backward's recomputed states of one state chunk (T + 1, n_chunk, W)
    registers: one state chunk (n_chunk, W) as a loop carry, the current token's rows

Per token the kernel reads one (1, W) row of Δ' and Δ'u (a dynamic second-minor load, which
Mosaic supports when the minor dimension is 128 lanes), takes the token's B and C columns out of
the (n_chunk, 128) slabs already broadcast across the lanes (_column_picker), and updates the
whole (n_chunk, W) state with broadcasts: no per-token relayout, and no (b, l, e, n) array outside
VMEM. Softplus, Δ'u, the D skip and the z gate run once per tile on whole (T, W) blocks.

Integer arithmetic on traced values uses lax.rem / lax.div (non-negative operands): jnp's % and //
lower through lax.sign, whose Mosaic rule asks for the TPU generation and so cannot lower on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # one vector register is (8, 128) fp32; B and C slabs hold 128 tokens on the lanes


def _softplus_parts(x):
    """Δ' = softplus(x) (x above 20 kept, as mamba_ssm does) and dΔ'/dx."""
    big = x > 20.0
    sp = jnp.where(big, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))
    return sp, jnp.where(big, 1.0, jax.nn.sigmoid(x))


def _valid_mask(plan, reverse, shape):
    """True where the (T, W) tile holds a real token of a real channel (padding is masked)."""
    si, ci = _seq_index(plan, reverse), pl.program_id(1)
    t = lax.broadcasted_iota(jnp.int32, shape, 0) + si * plan.seq_tile
    ch = lax.broadcasted_iota(jnp.int32, shape, 1) + lax.rem(ci, plan.tiles_per_group) * plan.lanes
    return (t < plan.length) & (ch < plan.p)


def _seq_index(plan, reverse):
    """The sequence tile this grid step works on (the backward walks the tiles in reverse)."""
    si = pl.program_id(2)
    return plan.n_seq_tiles - 1 - si if reverse else si


def _step_sizes(plan, reverse, delta_ref, bias_ref, softplus):
    """Δ' (T, W) fp32 with padded tokens and channels set to 0 (an identity step: exp(0 A) = 1 and
    no input), and dΔ'/d(delta). softplus(0 + bias) is not 0, so the mask is explicit."""
    x = delta_ref[0].astype(jnp.float32) + bias_ref[...]
    dt, ddt_dx = _softplus_parts(x) if softplus else (x, jnp.ones_like(x))
    valid = _valid_mask(plan, reverse, x.shape)
    return jnp.where(valid, dt, 0.0), jnp.where(valid, ddt_dx, 0.0)


def _column_picker(slab, plan):
    """pick(j): column j of a (rows, 128) slab (tokens on lanes), broadcast to (rows, W).

    "gather" (default): one in-register lane gather per vreg (tpu.dynamic_gather on the int32 bits,
    the dtype jax's TPU tests cover), the column landing on every lane at once. "reduce": a masked
    lane reduction then a lane broadcast, the more common Mosaic pattern but several XLU steps per
    vreg. One of the two is needed: a dynamic lane slice does not compile for TPU (jax's own
    test_lane_dynamic_slice in tests/pallas/tpu_pallas_test.py passes only in interpret mode)."""
    reps = plan.lanes // LANES
    if plan.pick == "gather":
        bits = lax.bitcast_convert_type(slab, jnp.int32)

        def pick(j):
            idx = jnp.full(slab.shape, j, jnp.int32)
            col = jnp.take_along_axis(bits, idx, axis=1, mode="promise_in_bounds")
            col = lax.bitcast_convert_type(col, jnp.float32)
            return col if reps == 1 else jnp.tile(col, (1, reps))

    else:
        lane_ids = lax.broadcasted_iota(jnp.int32, slab.shape, 1)

        def pick(j):
            col = jnp.sum(jnp.where(lane_ids == j, slab, 0.0), axis=1, keepdims=True)
            return jnp.broadcast_to(col, (slab.shape[0], plan.lanes))

    return pick


def _decay(dt_t, A, k_col, j):
    """exp(Δ'_t A) (ns, W), times keep_t (0 where a packed segment starts) when segments are on."""
    decay = jnp.exp(dt_t * A)
    return decay if k_col is None else decay * k_col(j)[0:1, :]


def _keep_picker(kt_ref, k, plan):
    """Column picker over the (8, 128) keep slab of token block k, or None without segments."""
    return None if kt_ref is None else _column_picker(kt_ref[0, k], plan)


def _silu_parts(z):
    sig = jax.nn.sigmoid(z)
    return z * sig, sig * (1.0 + z * (1.0 - sig))  # silu(z), silu'(z)


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, plan, softplus, has_z, has_seg, save):
    it = iter(refs)
    u_ref, delta_ref = next(it), next(it)
    z_ref = next(it) if has_z else None
    bt_ref, ct_ref, at_ref, d_ref, bias_ref, h0_ref = (next(it) for _ in range(6))
    kt_ref = next(it) if has_seg else None
    y_ref, hlast_ref = next(it), next(it)
    hstart_ref = next(it) if save else None
    h_scr, dt_scr, dtu_scr, y_scr = it
    si = pl.program_id(2)
    ns, T = plan.state_chunk, plan.seq_tile

    @pl.when(si == 0)
    def _():
        h_scr[...] = h0_ref[0]

    if save:  # the state entering this tile: the backward restarts the tile from it
        hstart_ref[0, 0] = h_scr[...]

    dt, _ = _step_sizes(plan, False, delta_ref, bias_ref, softplus)  # (T, W)
    dt_scr[...] = dt
    dtu_scr[...] = dt * u_ref[0].astype(jnp.float32)
    y_scr[...] = jnp.zeros_like(y_scr)

    def state_chunk(c, carry):
        rows = pl.ds(pl.multiple_of(c * ns, ns), ns)
        A = at_ref[rows, :]  # (ns, W)

        def token_block(k, h):
            # (ns, 128): B and C of 128 tokens, tokens on lanes
            b_col = _column_picker(bt_ref[0, 0, k, rows, :], plan)
            c_col = _column_picker(ct_ref[0, 0, k, rows, :], plan)
            k_col = _keep_picker(kt_ref, k, plan)

            def token(j, h):
                t = k * LANES + j
                dt_t = dt_scr[pl.ds(t, 1), :]  # (1, W)
                dtu_t = dtu_scr[pl.ds(t, 1), :]
                # Paper eq. 2a with ZOH A and Euler B (section 3.5): h = exp(Δ'A) h + Δ'u B.
                h = _decay(dt_t, A, k_col, j) * h + dtu_t * b_col(j)  # (ns, W)
                y_t = jnp.sum(h * c_col(j), axis=0, keepdims=True)
                y_scr[pl.ds(t, 1), :] += y_t  # partial sums over state chunks
                return h

            return lax.fori_loop(0, LANES, token, h)

        h = lax.fori_loop(0, T // LANES, token_block, h_scr[rows, :])
        h_scr[rows, :] = h
        return carry

    lax.fori_loop(0, plan.n_state_chunks, state_chunk, 0)

    y = y_scr[...] + u_ref[0].astype(jnp.float32) * d_ref[...]
    if has_z:
        y = y * _silu_parts(z_ref[0].astype(jnp.float32))[0]
    y_ref[0] = y.astype(y_ref.dtype)

    @pl.when(si == plan.n_seq_tiles - 1)
    def _():
        hlast_ref[0] = h_scr[...]


def _specs(plan, reverse):
    """BlockSpecs shared by both kernels, for grid (b, e_pad / W, L_pad / T)."""
    T, W, cpg = plan.seq_tile, plan.lanes, plan.tiles_per_group
    rev = (lambda s: plan.n_seq_tiles - 1 - s) if reverse else (lambda s: s)
    tokens = pl.BlockSpec((1, T, W), lambda b, c, s: (b, rev(s), c))
    bc = pl.BlockSpec(
        (1, 1, T // LANES, plan.n_pad, LANES), lambda b, c, s: (b, lax.div(c, cpg), rev(s), 0, 0)
    )
    at = pl.BlockSpec((plan.n_pad, W), lambda b, c, s: (0, c))
    row = pl.BlockSpec((1, W), lambda b, c, s: (0, c))
    state = pl.BlockSpec((1, plan.n_pad, W), lambda b, c, s: (b, 0, c))
    tile_state = pl.BlockSpec((1, 1, plan.n_pad, W), lambda b, c, s: (b, rev(s), 0, c))
    return tokens, bc, at, row, state, tile_state


def _keep_spec(plan, reverse):
    """keep^T (b, L_pad/128, 8, 128): the segment-start multiplier, tokens on lanes."""
    rev = (lambda s: plan.n_seq_tiles - 1 - s) if reverse else (lambda s: s)
    return pl.BlockSpec((1, plan.seq_tile // LANES, 8, LANES), lambda b, c, s: (b, rev(s), 0, 0))


def _call(kernel, plan, in_specs, out_specs, out_shape, scratch, name, interpret):
    params = pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=plan.vmem_limit_bytes,
    )
    return pl.pallas_call(
        kernel,
        grid=(plan.b, plan.n_lane_tiles, plan.n_seq_tiles),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=scratch,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )


def forward(plan, softplus, save, interpret, u, delta, z, bt, ct, at, D, bias, h0, kt):
    """Padded operands (see tpu_scan._prepare) -> y (b, L_pad, e_pad) in u.dtype, the final state
    (b, n_pad, e_pad) f32 and, when `save`, the state at each tile start (b, L_pad/T, n_pad, e_pad)."""
    tokens, bc, at_spec, row, state, tile_state = _specs(plan, reverse=False)
    has_z, has_seg = z is not None, kt is not None
    f32 = jnp.float32
    in_specs = [tokens, tokens] + [tokens] * has_z + [bc, bc, at_spec, row, row, state]
    in_specs += [_keep_spec(plan, reverse=False)] * has_seg
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct(h0.shape, f32),
    ]
    out_specs = [tokens, state]
    if save:
        out_shape.append(jax.ShapeDtypeStruct((plan.b, plan.n_seq_tiles, *h0.shape[1:]), f32))
        out_specs.append(tile_state)
    scratch = [pltpu.VMEM((plan.n_pad, plan.lanes), f32)]
    scratch += [pltpu.VMEM((plan.seq_tile, plan.lanes), f32)] * 3
    kernel = functools.partial(
        _fwd_kernel, plan=plan, softplus=softplus, has_z=has_z, has_seg=has_seg, save=save
    )
    args = (
        (u, delta)
        + ((z,) if has_z else ())
        + (bt, ct, at, D, bias, h0)
        + ((kt,) if has_seg else ())
    )
    call = _call(kernel, plan, in_specs, out_specs, out_shape, scratch, "tpu_scan_fwd", interpret)
    return call(*args)


# ----------------------------------------------------------------------------------------------
# Backward. Grid steps walk the sequence tiles last to first. Per tile and per state chunk:
# recompute the tile's states forward from the saved tile-start state into VMEM, then run the
# adjoint backwards over the tile. With G_t = dL/dh_t (everything after t included),
#   G_t = R_t + g_t C_t,   R_{t-1} = exp(Δ'_t A) G_t,   R at the last token = dL/dh_L,
# where g = gy silu(z) is the gradient of y before the gate, and
#   dC_t = Σ_e g_t h_t,  dB_t = Σ_e G_t Δ'_t u_t,  d(Δ'u)_t = Σ_n G_t B_t,
#   d(Δ'A)_t = G_t h_{t-1} exp(Δ'_t A)  ->  dA += d(Δ'A) Δ',  dΔ'_t += Σ_n d(Δ'A) A.


def _bwd_kernel(*refs, plan, softplus, has_z, has_seg):
    it = iter(refs)
    u_ref, delta_ref = next(it), next(it)
    z_ref = next(it) if has_z else None
    gy_ref, bt_ref, ct_ref, at_ref, d_ref, bias_ref, hstart_ref, ghl_ref = (
        next(it) for _ in range(8)
    )
    kt_ref = next(it) if has_seg else None
    du_ref, ddelta_ref = next(it), next(it)
    dz_ref = next(it) if has_z else None
    dbt_ref, dct_ref, da_ref, dd_ref, dbias_ref, dh0_ref = (next(it) for _ in range(6))
    r_scr, da_scr, dd_scr, dbias_scr, dt_scr, dtu_scr, g_scr, ddtu_scr, ddta_scr, hist = (
        next(it) for _ in range(10)
    )
    ypre_scr = next(it) if has_z else None
    si = pl.program_id(2)
    ns, T = plan.state_chunk, plan.seq_tile
    n_blocks = T // LANES

    @pl.when(si == 0)  # the last tile of the sequence: start from dL/dh_L
    def _():
        r_scr[...] = ghl_ref[0]
        da_scr[...] = jnp.zeros_like(da_scr)
        dd_scr[...] = jnp.zeros_like(dd_scr)
        dbias_scr[...] = jnp.zeros_like(dbias_scr)

    dt, _ = _step_sizes(plan, True, delta_ref, bias_ref, softplus)  # (T, W)
    dt_scr[...] = dt
    dtu_scr[...] = dt * u_ref[0].astype(jnp.float32)
    gy = gy_ref[0].astype(jnp.float32)
    g_scr[...] = gy * _silu_parts(z_ref[0].astype(jnp.float32))[0] if has_z else gy
    if has_z:
        ypre_scr[...] = jnp.zeros_like(ypre_scr)
    ddtu_scr[...] = jnp.zeros_like(ddtu_scr)
    ddta_scr[...] = jnp.zeros_like(ddta_scr)
    lane_ids = lax.broadcasted_iota(jnp.int32, (ns, LANES), 1)

    def state_chunk(c, carry):
        rows = pl.ds(pl.multiple_of(c * ns, ns), ns)
        A = at_ref[rows, :]  # (ns, W)
        hist[0] = hstart_ref[0, 0, rows, :]

        def fwd_block(k, h):  # recompute the tile's states; hist[t] is the state before token t
            b_col = _column_picker(bt_ref[0, 0, k, rows, :], plan)
            c_col = _column_picker(ct_ref[0, 0, k, rows, :], plan)
            k_col = _keep_picker(kt_ref, k, plan)

            def token(j, h):
                t = k * LANES + j
                decay = _decay(dt_scr[pl.ds(t, 1), :], A, k_col, j)
                h = decay * h + dtu_scr[pl.ds(t, 1), :] * b_col(j)
                hist[t + 1] = h
                if has_z:  # y before D and the gate, for dz
                    ypre_scr[pl.ds(t, 1), :] += jnp.sum(h * c_col(j), axis=0, keepdims=True)
                return h

            return lax.fori_loop(0, LANES, token, h)

        lax.fori_loop(0, n_blocks, fwd_block, hist[0])

        def bwd_block(kk, carry):
            k = n_blocks - 1 - kk
            b_col = _column_picker(bt_ref[0, 0, k, rows, :], plan)
            c_col = _column_picker(ct_ref[0, 0, k, rows, :], plan)
            k_col = _keep_picker(kt_ref, k, plan)

            def token(jj, carry):
                R, dA, db, dc = carry
                j = LANES - 1 - jj
                t = k * LANES + j
                dt_t = dt_scr[pl.ds(t, 1), :]  # (1, W)
                g_t = g_scr[pl.ds(t, 1), :]
                h = hist[t + 1]  # (ns, W)
                b_t = b_col(j)
                G = R + g_t * c_col(j)  # dL/dh_t
                here = lane_ids == j  # this token's lane in the (ns, 128) dB, dC slabs
                dc = jnp.where(here, jnp.sum(g_t * h, axis=1, keepdims=True), dc)
                g_dtu = G * dtu_scr[pl.ds(t, 1), :]
                db = jnp.where(here, jnp.sum(g_dtu, axis=1, keepdims=True), db)
                ddtu_scr[pl.ds(t, 1), :] += jnp.sum(G * b_t, axis=0, keepdims=True)
                decay = _decay(dt_t, A, k_col, j)  # keep_t exp(Δ'_t A)
                g_dta = G * hist[t] * decay  # dL/d(Δ'A)
                ddta_scr[pl.ds(t, 1), :] += jnp.sum(g_dta * A, axis=0, keepdims=True)
                return decay * G, dA + g_dta * dt_t, db, dc

            zeros = jnp.zeros((ns, LANES), jnp.float32)
            R, dA, db, dc = lax.fori_loop(0, LANES, token, (*carry, zeros, zeros))
            dbt_ref[0, 0, k, rows, :] = db  # this channel tile's partial sums, tokens on lanes
            dct_ref[0, 0, k, rows, :] = dc
            return R, dA

        R, dA = lax.fori_loop(0, n_blocks, bwd_block, (r_scr[rows, :], da_scr[rows, :]))
        r_scr[rows, :] = R
        da_scr[rows, :] = dA
        return carry

    lax.fori_loop(0, plan.n_state_chunks, state_chunk, 0)

    # Epilogue over the whole tile (inputs re-read rather than kept live across the loops).
    u = u_ref[0].astype(jnp.float32)
    D, dt, g, ddtu = d_ref[...], dt_scr[...], g_scr[...], ddtu_scr[...]
    du_ref[0] = (ddtu * dt + g * D).astype(du_ref.dtype)
    _, ddt_dx = _step_sizes(plan, True, delta_ref, bias_ref, softplus)  # 0 on padding
    ddelta = (ddtu * u + ddta_scr[...]) * ddt_dx
    ddelta_ref[0] = ddelta.astype(ddelta_ref.dtype)
    if has_z:
        dsilu = _silu_parts(z_ref[0].astype(jnp.float32))[1]
        dz_ref[0] = (gy_ref[0].astype(jnp.float32) * (ypre_scr[...] + u * D) * dsilu).astype(
            dz_ref.dtype
        )
    dd_scr[...] += jnp.sum(g * u, axis=0, keepdims=True)
    dbias_scr[...] += jnp.sum(ddelta, axis=0, keepdims=True)

    @pl.when(si == plan.n_seq_tiles - 1)  # the first tile: dL/dh_0 and the parameter sums
    def _():
        dh0_ref[0] = r_scr[...]
        da_ref[0] = da_scr[...]
        dd_ref[0] = dd_scr[...]
        dbias_ref[0] = dbias_scr[...]


def backward(plan, softplus, interpret, u, delta, z, bt, ct, at, D, bias, kt, hstarts, gy, ghl):
    """Cotangents of the padded operands. du, ddelta, dz come in the inputs' dtypes; dB^T, dC^T
    (b, e_pad/W, L_pad/128, n_pad, 128), dA^T (b, n_pad, e_pad), dD and d(delta_bias) (b, 1, e_pad)
    are per batch row and channel tile partial sums (fp32) that the caller adds in a fixed order."""
    tokens, bc, at_spec, row, state, tile_state = _specs(plan, reverse=True)
    T, W, f32 = plan.seq_tile, plan.lanes, jnp.float32
    has_z, has_seg = z is not None, kt is not None
    b, n_pad, e_pad = plan.b, plan.n_pad, plan.e_pad
    per_tile = pl.BlockSpec(
        (1, 1, T // LANES, n_pad, LANES),
        lambda bi, c, s: (bi, c, plan.n_seq_tiles - 1 - s, 0, 0),
    )
    sums = pl.BlockSpec((1, 1, W), lambda bi, c, s: (bi, 0, c))
    in_specs = [tokens, tokens] + [tokens] * has_z
    in_specs += [tokens, bc, bc, at_spec, row, row, tile_state, state]
    in_specs += [_keep_spec(plan, reverse=True)] * has_seg
    out_specs = [tokens, tokens] + [tokens] * has_z + [per_tile, per_tile, state, sums, sums, state]
    bct = jax.ShapeDtypeStruct((b, plan.n_lane_tiles, plan.length_pad // LANES, n_pad, LANES), f32)
    out_shape = [
        jax.ShapeDtypeStruct(u.shape, u.dtype),
        jax.ShapeDtypeStruct(delta.shape, delta.dtype),
    ]
    out_shape += [jax.ShapeDtypeStruct(z.shape, z.dtype)] if has_z else []
    out_shape += [bct, bct, jax.ShapeDtypeStruct((b, n_pad, e_pad), f32)]
    out_shape += [jax.ShapeDtypeStruct((b, 1, e_pad), f32)] * 2
    out_shape += [jax.ShapeDtypeStruct((b, n_pad, e_pad), f32)]
    scratch = [pltpu.VMEM((n_pad, W), f32)] * 2 + [pltpu.VMEM((1, W), f32)] * 2
    scratch += [pltpu.VMEM((T, W), f32)] * 5
    scratch += [pltpu.VMEM((T + 1, plan.state_chunk, W), f32)]
    scratch += [pltpu.VMEM((T, W), f32)] * has_z
    kernel = functools.partial(
        _bwd_kernel, plan=plan, softplus=softplus, has_z=has_z, has_seg=has_seg
    )
    args = (u, delta) + ((z,) if has_z else ()) + (gy, bt, ct, at, D, bias, hstarts, ghl)
    args += (kt,) if has_seg else ()
    call = _call(kernel, plan, in_specs, out_specs, out_shape, scratch, "tpu_scan_bwd", interpret)
    return call(*args)
