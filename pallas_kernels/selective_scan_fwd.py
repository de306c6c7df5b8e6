"""Forward selective-scan kernels (Mosaic GPU, Hopper).

Grid (b, e / w, chunks). A block owns w channels (128; 64 with BlockSizes(fwd_lanes=2), two
threads per channel, cm.Lanes) of one batch row and one sequence chunk.
  HBM  -> SMEM: T-token tiles of u, delta, z (T, w) and B, C (T, n), TMA, double buffered.
  regs:        the (w, n) state h and A (a row, or half a row, per thread), D and delta_bias.
  SMEM -> HBM: y tiles (T, w), the chunk's end state, and (training) the state at each tile start.
The (b, l, e, n) states never leave registers.

Sequence chunks run in parallel in two passes. A chunk maps its start state affinely,
h_end = exp(A sum(dt)) h_start + h_local, so pass 1 ("state") runs every chunk from a zero state
and returns h_local and sum(dt); a tiny associative scan in JAX composes the chunk maps into each
chunk's true start state; pass 2 ("full") reruns every chunk from its start state and writes y.
With one chunk, pass 1 is skipped.

Packed sequences (segment ids): `reset` (b, l_pad, 4) holds 0, or -inf where a new segment
starts; each token's value is read from SMEM as a scalar and added to the decay's exponent
(cm.Lanes.decay), so the state restarts from zero there. A chunk with a reset inside has no dependence on its start state: its combine
decay is multiplied by 0 (cm.chunk_alive). Without segments (reset None) the kernels are
unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common as cm


def _chunk_tiles(plan, ci):
    return ci * plan.tiles_per_chunk


def _step_inputs(plan, lay, refs, t, tile_idx, bias, delta_softplus):
    """Loads token t of the current tile and discretizes delta. Returns (dt, u) as (w,) f32."""
    u_s, d_s = refs
    valid = tile_idx * plan.tile + t < plan.length
    dt, _ = cm.discretize(lay.load_row(d_s.at[t]), bias, valid, delta_softplus)
    return dt, lay.load_row(u_s.at[t])


def state_pass(u, delta, B, A, bias, plan: cm.Plan, *, delta_softplus, reset=None, interpret=False):
    """Pass 1: every chunk from a zero state. Returns h_local (b, c, e, n) f32, sum dt (b, c, e)."""
    T, n = plan.tile, plan.n_pad
    lay = cm.Lanes(plan.fwd_lanes, n, interpret)
    w, n_eblocks = lay.w, plan.e_pad // lay.w
    epg = n_eblocks // plan.g
    has_reset = reset is not None

    def kernel(*refs):
        u_g, d_g, B_g = refs[:3]
        R_g = refs[3] if has_reset else None
        A_g, bias_g, hloc_g, dts_g, h_s, dts_s = refs[3 + has_reset :]
        bi, eb, ci = (jax.lax.axis_index(a) for a in ("b", "e", "c"))
        e0 = pl.multiple_of(eb * w, w)
        A_r = lay.load_state(A_g.at[pl.ds(e0, w)])  # (w, n) regs
        bias = lay.load_row(bias_g.at[pl.ds(e0, w)])
        tile0 = _chunk_tiles(plan, ci)

        def body(idx, *srefs):
            (u_s, d_s, B_s), R_s, carry = srefs[:3], srefs[3] if has_reset else None, srefs[-1]
            tile_idx = tile0 + idx[0]

            def step(t, carry):
                h, dts = carry
                dt, uu = _step_inputs(plan, lay, (u_s, d_s), t, tile_idx, bias, delta_softplus)
                Bt = lay.load_col(B_s.at[t])  # (n,)
                rt = cm.load_reset(R_s, t) if has_reset else None
                h = lay.decay(dt, A_r, rt) * h + lay.rows(dt * uu) * lay.cols(Bt)
                return h, dts + dt

            carry = cm.token_loop(T, step, carry, plan.unroll)
            # The pipeline refills this SMEM slot right after the body: all warps must be done.
            plgpu.commit_smem()
            return carry

        in_specs = [
            pl.BlockSpec((None, T, w), lambda i: (bi, tile0 + i, eb)),
            pl.BlockSpec((None, T, w), lambda i: (bi, tile0 + i, eb)),
            pl.BlockSpec((None, T, None, n), lambda i: (bi, tile0 + i, eb // epg, 0)),
        ]
        if has_reset:
            in_specs.append(cm.reset_spec(plan, bi, lambda i: tile0 + i))
        h, dts = plgpu.emit_pipeline(
            body,
            grid=(plan.tiles_per_chunk,),
            in_specs=in_specs,
            max_concurrent_steps=plan.stages,
            init_carry=(lay.zeros_state(), lay.zeros_row()),
        )(u_g, d_g, B_g, *([R_g] if has_reset else []))
        h_s[...] = h
        dts_s[...] = dts
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_s, hloc_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.copy_smem_to_gmem(dts_s, dts_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.wait_smem_to_gmem(0)

    b, c, e = plan.b, plan.n_chunks, plan.e_pad
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, c, e, n), jnp.float32),
            jax.ShapeDtypeStruct((b, c, e), jnp.float32),
        ),
        scratch_types=[plgpu.SMEM((w, n), jnp.float32), plgpu.SMEM((w,), jnp.float32)],
        grid=(b, n_eblocks, c),
        grid_names=("b", "e", "c"),
        compiler_params=cm.compiler_params(),
        interpret=cm.interpret_params(interpret),
        kernel_name="selective_scan_fwd_state",
    )(u, delta, B, *([reset] if has_reset else []), A, bias)


def full_pass(u, delta, z, B, C, A, D, bias, h_start, plan: cm.Plan, *, delta_softplus,
              save_checkpoints, y_dtype=None, reset=None, interpret=False):  # fmt: skip
    """Pass 2: every chunk from its start state h_start (b, c, e, n).

    Returns y (b, l, e) in y_dtype (default u.dtype), the state after each chunk (b, c, e, n), and with
    save_checkpoints the state at each tile start (b, c * tiles_per_chunk, e, n), all f32."""
    T, n = plan.tile, plan.n_pad
    lay = cm.Lanes(plan.fwd_lanes, n, interpret, None if z is None else z.dtype)
    w, n_eblocks = lay.w, plan.e_pad // lay.w
    epg = n_eblocks // plan.g
    has_z = z is not None
    has_reset = reset is not None
    y_dtype = jnp.dtype(y_dtype or u.dtype)
    n_out_copies = 2 if save_checkpoints else 1

    def kernel(*refs):
        it = iter(refs)
        u_g, d_g = next(it), next(it)
        z_g = next(it) if has_z else None
        B_g, C_g = next(it), next(it)
        R_g = next(it) if has_reset else None
        A_g, D_g, bias_g, hst_g = (next(it) for _ in range(4))
        y_g, hend_g = next(it), next(it)
        ck_g = next(it) if save_checkpoints else None
        y_s, h_s = next(it), next(it)
        ck_s = next(it) if save_checkpoints else None

        bi, eb, ci = (jax.lax.axis_index(a) for a in ("b", "e", "c"))
        e0 = pl.multiple_of(eb * w, w)
        A_r = lay.load_state(A_g.at[pl.ds(e0, w)])
        Dv = lay.load_row(D_g.at[pl.ds(e0, w)])
        bias = lay.load_row(bias_g.at[pl.ds(e0, w)])
        h0 = lay.load_state(hst_g.at[bi, ci, pl.ds(e0, w)])
        tile0 = _chunk_tiles(plan, ci)

        def body(idx, *srefs):
            it = iter(srefs)
            u_s, d_s = next(it), next(it)
            z_s = next(it) if has_z else None
            B_s, C_s = next(it), next(it)
            R_s = next(it) if has_reset else None
            h = next(it)
            tile_idx = tile0 + idx[0]
            slot = idx[0] % 2
            # The copies issued two steps ago read this slot; wait for them before overwriting.
            plgpu.wait_smem_to_gmem(n_out_copies, wait_read_only=True)
            if save_checkpoints:
                ck_s[slot] = h
            ys = y_s.at[slot]

            def step(t, carry):
                h, out = carry
                dt, uu = _step_inputs(plan, lay, (u_s, d_s), t, tile_idx, bias, delta_softplus)
                Bt, Ct = lay.load_col(B_s.at[t]), lay.load_col(C_s.at[t])  # (n,)
                rt = cm.load_reset(R_s, t) if has_reset else None
                h = lay.decay(dt, A_r, rt) * h + lay.rows(dt * uu) * lay.cols(Bt)
                y = jnp.sum(h * lay.cols(Ct), axis=1) + Dv * uu  # (w,)
                if has_z:
                    zz = lay.load_row(z_s.at[t])
                    y = y * zz * lay.gate_sigmoid(zz)
                if plan.unroll:  # stored after the tile: no SMEM store between the loads
                    return h, out + (y.astype(ys.dtype),)
                ys[t] = y.astype(ys.dtype)
                return h, out

            h_new, out = cm.token_loop(T, step, (h, ()), plan.unroll)
            for t, y in enumerate(out):
                ys[t] = y
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(ys, y_g.at[bi, pl.ds(tile_idx * T, T), pl.ds(e0, w)])
            if save_checkpoints:
                plgpu.copy_smem_to_gmem(ck_s.at[slot], ck_g.at[bi, tile_idx, pl.ds(e0, w)])
            return h_new

        tok_spec = pl.BlockSpec((None, T, w), lambda i: (bi, tile0 + i, eb))
        bc_spec = pl.BlockSpec((None, T, None, n), lambda i: (bi, tile0 + i, eb // epg, 0))
        in_specs = [tok_spec, tok_spec] + ([tok_spec] if has_z else []) + [bc_spec, bc_spec]
        operands = (u_g, d_g) + ((z_g,) if has_z else ()) + (B_g, C_g)
        if has_reset:
            in_specs.append(cm.reset_spec(plan, bi, lambda i: tile0 + i))
            operands += (R_g,)
        h = plgpu.emit_pipeline(
            body,
            grid=(plan.tiles_per_chunk,),
            in_specs=in_specs,
            max_concurrent_steps=plan.stages,
            init_carry=h0,
        )(*operands)
        plgpu.wait_smem_to_gmem(0)
        h_s[...] = h
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(h_s, hend_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.wait_smem_to_gmem(0)

    b, c, e = plan.b, plan.n_chunks, plan.e_pad
    n_ck = c * plan.tiles_per_chunk
    out_type = [
        jax.ShapeDtypeStruct((b, plan.length_pad, e), y_dtype),
        jax.ShapeDtypeStruct((b, c, e, n), jnp.float32),
    ]
    scratch = [plgpu.SMEM((2, T, w), y_dtype), plgpu.SMEM((w, n), jnp.float32)]
    if save_checkpoints:
        out_type.append(jax.ShapeDtypeStruct((b, n_ck, e, n), jnp.float32))
        scratch.append(plgpu.SMEM((2, w, n), jnp.float32))
    operands = (u, delta) + ((z,) if has_z else ()) + (B, C) + ((reset,) if has_reset else ())
    operands += (A, D, bias, h_start)
    return plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(b, n_eblocks, c),
        grid_names=("b", "e", "c"),
        compiler_params=cm.compiler_params(),
        interpret=cm.interpret_params(interpret),
        kernel_name="selective_scan_fwd",
    )(*operands)


def forward(u, delta, z, B, C, A, D, bias, h0, plan: cm.Plan, *, delta_softplus,
            save_checkpoints, y_dtype=None, reset=None, interpret=False):  # fmt: skip
    """Both passes on padded operands. h0: (b, e, n) f32; A: (e, n) f32, pre-scaled by log2(e)
    (the kernels compute exp(dt A) as exp2(dt A log2 e)); reset: None or (b, l_pad, 4) f32 segment
    reset offsets (cm.segment_resets).

    Returns (y, final state (b, e, n), checkpoints or None, chunk dt sums (b, c, e) or None)."""
    if plan.n_chunks > 1:
        kw = dict(delta_softplus=delta_softplus, reset=reset, interpret=interpret)
        h_loc, dt_sum = state_pass(u, delta, B, A, bias, plan, **kw)
        decay = jnp.exp2(dt_sum[..., None] * A)  # (b, c, e, n)
        if reset is not None:
            decay = decay * cm.chunk_alive(reset, plan.n_chunks)[:, :, None, None]
        h_start = cm.chunk_combine(decay, h_loc, h0)
    else:
        h_start, dt_sum = h0[:, None], None
    outs = full_pass(
        u, delta, z, B, C, A, D, bias, h_start, plan, delta_softplus=delta_softplus,
        save_checkpoints=save_checkpoints, y_dtype=y_dtype, reset=reset, interpret=interpret,
    )  # fmt: skip
    y, h_end = outs[0], outs[1]
    ckpt = outs[2] if save_checkpoints else None
    return y, h_end[:, -1], ckpt, dt_sum
