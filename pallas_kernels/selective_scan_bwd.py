"""Backward selective-scan kernels (Mosaic GPU, Hopper): a reverse scan with recomputation.

The adjoint of h_t = a_t h_{t-1} + dt_t u_t B_t (a_t = exp(dt_t A)) with y_t = h_t . C_t is
    lam_t = G_t + gys_t C_t,   G_{t-1} = a_t lam_t   (G_L = the final state's cotangent)
where gys_t is the cotangent of h_t . C_t. A chunk maps G at its end affinely to G at its start,
with the same decay exp(A sum(dt)) as the forward, so chunks run in parallel as in the forward:
pass 1 ("adjoint") runs each chunk backwards from G = 0, JAX composes the chunk maps, and the main
pass runs each chunk backwards from its true end value.

Main pass, per block (W = 128 channels, one chunk), tiles in reverse:
  HBM -> SMEM: tiles of u, delta, z, dy (T, W), B, C (T, n), and the forward's saved state at the
               tile's start (W, n) f32.
  SMEM scratch: the state every `sub` tokens of the tile, from a forward sweep over the tile.
  registers:   G, A, the dA/dD/d_bias accumulators, and the `sub` states of one sub-tile,
               recomputed from its SMEM start state and walked backwards.
  SMEM -> HBM: du, d_delta, dz tiles; per-block partials of dB, dC (T, n) f32 (summed over blocks
               in JAX, in a fixed order, so the gradients are deterministic); at the end dA, dD,
               d_bias partials and G at the chunk start (the initial state's cotangent for chunk 0).

Packed sequences: with `reset` (cm.segment_resets) the decay a_t is 0 where a new segment starts,
in the recompute and in the adjoint alike, so G stops there (G_{t-1} = a_t lam_t = 0) and the
chunk maps of the adjoint pass lose their G_end term when a reset lies inside (cm.chunk_alive).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.extend.mlir import ir
from jax.extend.mlir.dialects import arith, memref, vector

from pallas_kernels import _common as cm
from pallas_kernels._common import W


def _gate(gy, zz, y_pre, lay):
    """out = y_pre * silu(z): returns (d y_pre, dz)."""
    sig = lay.gate_sigmoid(zz)
    silu = zz * sig
    return gy * silu, gy * y_pre * sig * (1.0 + zz * (1.0 - sig))


def _warp_sums(pc, pb, red_s, t, n, interpret):
    """Per-warp channel sums of one token's dC and dB products.

    pc, pb: (W, n) products, one channel per thread. Writes red_s[w, t * 2n + i] = the sum over
    warp w's 32 channels of value i of concat(pc, pb) (i < n: dC, else dB). On the GPU this is a
    recursive-halving shuffle: at each step a lane keeps half of its values and swaps the other
    half with the lane `half` away, so 2n values take 2n - 1 shuffles (16 + 8 + 4 + 2 + 1 for n =
    16) and leave lane l holding value l % 2n, which it stores (the 32 lanes hit 32 banks)."""
    v = 2 * n
    if interpret:  # interpret mode runs no Mosaic GPU code: the same sums, in plain JAX
        x = jnp.concatenate([pc, pb], axis=1).reshape(W // 32, 32, v)
        red_s[:, pl.ds(t * v, v)] = jnp.sum(x, axis=1)
        return

    @plgpu.inline_mgpu(arg_types=(cm.STATE, cm.STATE, plgpu.RefType()))
    def reduce(_, a, b, ref):
        i32, index = ir.IntegerType.get_signless(32), ir.IndexType.get()
        c = lambda x: arith.constant(i32, x)
        vals = list(a.registers.flat) + list(b.registers.flat)  # vector<1xf32>, value order
        assert len(vals) == v, (len(vals), v)
        tid = mgpu_utils.thread_idx()
        lane = arith.andi(tid, c(31))
        warp = arith.andi(arith.shrui(tid, c(5)), c(3))
        half = v // 2
        while half:
            upper = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(lane, c(half)), c(0))
            nxt = []
            for i in range(half):
                lo, hi = vals[i], vals[i + half]
                keep = arith.select(upper, hi, lo)
                send = arith.select(upper, lo, hi)
                nxt.append(arith.addf(keep, mgpu_utils.shfl_bfly(send, half)))
            vals, half = nxt, half // 2
        acc, dist = vals[0], v
        while dist < 32:  # n < 16: lanes l and l + 2n hold partial sums of the same value
            acc = arith.addf(acc, mgpu_utils.shfl_bfly(acc, dist))
            dist *= 2
        scalar = vector.extract(
            acc, dynamic_position=[], static_position=ir.DenseI64ArrayAttr.get([0])
        )
        col = arith.addi(c(t * v), arith.remui(lane, c(v)))
        cast = lambda x: arith.index_cast(index, x)
        memref.store(scalar, ref, [cast(warp), cast(col)])

    reduce(pc, pb, red_s)


def adjoint_pass(
    delta, z, gy, C, A, bias, plan: cm.Plan, *, delta_softplus, reset=None, interpret=False
):
    """Pass 1: each chunk but the first backwards from G = 0. Returns G at the start of chunks 1
    .. c - 1 (b, c - 1, e, n) and their sums of dt (b, c - 1, e), which give each chunk's decay
    exp(A sum dt). The first chunk's map would only carry G to the sequence start, which no
    other chunk needs (the main pass computes it), so it is not run."""
    T, n = plan.tile, plan.n_pad
    # The adjoint pass always runs 128-channel blocks.
    lay = cm.Lanes(1, n, interpret, None if z is None else z.dtype)
    epg, tpc = plan.eblocks_per_group, plan.tiles_per_chunk
    has_z = z is not None
    has_reset = reset is not None

    def kernel(*refs):
        it = iter(refs)
        d_g = next(it)
        z_g = next(it) if has_z else None
        gy_g, C_g = next(it), next(it)
        R_g = next(it) if has_reset else None
        A_g, bias_g, gloc_g, dts_g, g_s, dts_s = (next(it) for _ in range(6))
        bi, eb, co = (jax.lax.axis_index(a) for a in ("b", "e", "c"))
        e0 = pl.multiple_of(eb * W, W)
        A_r = lay.load_state(A_g.at[pl.ds(e0, W)])
        bias = lay.load_row(bias_g.at[pl.ds(e0, W)])
        last = (co + 1) * tpc + tpc - 1  # chunk co + 1's last tile

        def body(idx, *srefs):
            it = iter(srefs)
            d_s = next(it)
            z_s = next(it) if has_z else None
            gy_s, C_s = next(it), next(it)
            R_s = next(it) if has_reset else None
            carry = next(it)
            tile_idx = last - idx[0]

            def step(i, carry):
                G, dts = carry
                t = T - 1 - i
                valid = tile_idx * T + t < plan.length
                dt, _ = cm.discretize(lay.load_row(d_s.at[t]), bias, valid, delta_softplus)
                gys = lay.load_row(gy_s.at[t])
                if has_z:
                    zz = lay.load_row(z_s.at[t])
                    gys = gys * zz * lay.gate_sigmoid(zz)
                lam = G + lay.rows(gys) * lay.cols(lay.load_col(C_s.at[t]))
                rt = cm.load_reset(R_s, t) if has_reset else None
                return lay.decay(dt, A_r, rt) * lam, dts + dt

            carry = cm.token_loop(T, step, carry, plan.unroll)
            # The pipeline refills this SMEM slot right after the body: all warps must be done.
            plgpu.commit_smem()
            return carry

        tok = pl.BlockSpec((None, T, W), lambda i: (bi, last - i, eb))
        bc = pl.BlockSpec((None, T, None, n), lambda i: (bi, last - i, eb // epg, 0))
        specs = [tok] + ([tok] if has_z else []) + [tok, bc]
        ops = (d_g,) + ((z_g,) if has_z else ()) + (gy_g, C_g)
        if has_reset:
            specs.append(cm.reset_spec(plan, bi, lambda i: last - i))
            ops += (R_g,)
        G, dts = plgpu.emit_pipeline(
            body,
            grid=(tpc,),
            in_specs=specs,
            max_concurrent_steps=plan.stages,
            init_carry=(lay.zeros_state(), lay.zeros_row()),
        )(*ops)
        g_s[...] = G
        dts_s[...] = dts
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(g_s, gloc_g.at[bi, co, pl.ds(e0, W)])
        plgpu.copy_smem_to_gmem(dts_s, dts_g.at[bi, co, pl.ds(e0, W)])
        plgpu.wait_smem_to_gmem(0)

    b, c, e = plan.b, plan.n_chunks - 1, plan.e_pad
    ops = (delta,) + ((z,) if has_z else ()) + (gy, C) + ((reset,) if has_reset else ())
    ops += (A, bias)
    return plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct((b, c, e, n), jnp.float32),
            jax.ShapeDtypeStruct((b, c, e), jnp.float32),
        ),
        scratch_types=[plgpu.SMEM((W, n), jnp.float32), plgpu.SMEM((W,), jnp.float32)],
        grid=(b, plan.n_eblocks, c),
        grid_names=("b", "e", "c"),
        compiler_params=cm.compiler_params(),
        interpret=cm.interpret_params(interpret),
        kernel_name="selective_scan_bwd_adjoint",
    )(*ops)


def dbc_round(plan: cm.Plan):
    """Tokens per dB, dC round in the main pass's flat output: 1 for the shuffle reduction; for
    the SMEM one, 32 / n, whose products fill one 64-row WGMMA tile (2 x R x n = 64)."""
    return 1 if plan.bwd_reduce == "shuffle" else 32 // plan.n_pad


def main_pass(u, delta, z, B, C, gy, ckpt, A, D, bias, G_end, plan: cm.Plan, *, delta_softplus,
              grad_dtype=None, reset=None, interpret=False):  # fmt: skip
    """Gradients of every chunk, walking backwards from G_end (b, c, e, n) at each chunk's end.

    dB and dC come back as per-block partial sums over the block's W channels, flattened as
    (b, e_blocks, l_pad / R, 2 (dC, dB), R, n) with R = dbc_round(plan) tokens per round."""
    T, K, n = plan.tile, plan.sub, plan.n_pad
    shuffle = plan.bwd_reduce == "shuffle"
    R = dbc_round(plan)
    lay = cm.Lanes(plan.bwd_lanes, n, interpret, None if z is None else z.dtype)
    w = lay.w  # channels per block
    n_eblocks = plan.e_pad // w
    epg, tpc = n_eblocks // plan.g, plan.tiles_per_chunk
    has_z = z is not None
    has_reset = reset is not None
    n_copies = (3 if has_z else 2) + 1
    du_dtype, dd_dtype = (grad_dtype, grad_dtype) if grad_dtype else (u.dtype, delta.dtype)

    def kernel(*refs):
        it = iter(refs)
        u_g, d_g = next(it), next(it)
        z_g = next(it) if has_z else None
        B_g, C_g, gy_g, ck_g = (next(it) for _ in range(4))
        R_g = next(it) if has_reset else None
        A_g, D_g, bias_g, gend_g = (next(it) for _ in range(4))
        du_g, dd_g = next(it), next(it)
        dz_g = next(it) if has_z else None
        dbc_g, dA_g, dD_g, dbias_g, dh_g = (next(it) for _ in range(5))
        du_s, dd_s = next(it), next(it)
        dz_s = next(it) if has_z else None
        dbc_s, sub_s, vec_s, x_s = (next(it) for _ in range(4))  # x_s: (4, T 2n) if shuffle

        bi, eb, ci = (jax.lax.axis_index(a) for a in ("b", "e", "c"))
        e0 = pl.multiple_of(eb * w, w)
        A_r = lay.load_state(A_g.at[pl.ds(e0, w)])
        Dv = lay.load_row(D_g.at[pl.ds(e0, w)])
        bias = lay.load_row(bias_g.at[pl.ds(e0, w)])
        G0 = lay.load_state(gend_g.at[bi, ci, pl.ds(e0, w)])
        last = ci * tpc + tpc - 1

        def body(idx, *srefs):
            it = iter(srefs)
            u_s, d_s = next(it), next(it)
            z_s = next(it) if has_z else None
            B_s, C_s, gy_s, ck_s = (next(it) for _ in range(4))
            R_s = next(it) if has_reset else None
            carry = next(it)
            tile_idx = last - idx[0]
            slot = idx[0] % 2
            plgpu.wait_smem_to_gmem(n_copies, wait_read_only=True)
            G, dA_acc, dD_acc, db_acc = carry

            def token(t):
                valid = tile_idx * T + t < plan.length
                dt, ddt = cm.discretize(
                    lay.load_row(d_s.at[t]), bias, valid, delta_softplus, lay.recip
                )
                # The reset offset (a scalar, one register) travels with the token, so the
                # reverse step's decay is the same expression as the recompute's (merged).
                rt = cm.load_reset(R_s, t) if has_reset else None
                return dt, ddt, lay.load_row(u_s.at[t]), rt

            def step(h, t, tok):
                dt, _, uu, rt = tok
                a = lay.decay(dt, A_r, rt)
                return a * h + lay.rows(dt * uu) * lay.cols(lay.load_col(B_s.at[t]))

            def advance(h, t):
                return step(h, t, token(t))

            # Forward sweep over the tile from its saved start state; keep every K-th state.
            h = lay.load_state(ck_s)
            for k in range(1, T // K):
                h = cm.token_loop(K, lambda j, h, k=k: advance(h, (k - 1) * K + j), h, plan.unroll)
                sub_s[k - 1] = h

            for k in reversed(range(T // K)):
                h_start = lay.load_state(ck_s if k == 0 else sub_s.at[k - 1])
                hs, cache, h = [], [], h_start
                for j in range(K):  # recompute this sub-tile's states into registers
                    cache.append(token(k * K + j))
                    h = step(h, k * K + j, cache[-1])
                    hs.append(h)
                for j in reversed(range(K)):
                    t = k * K + j
                    dt, ddt, uu, rt = cache[j]
                    h_t, h_prev = hs[j], (hs[j - 1] if j else h_start)
                    Bt, Ct = lay.load_col(B_s.at[t]), lay.load_col(C_s.at[t])
                    gys = lay.load_row(gy_s.at[t])
                    if has_z:
                        y_pre = jnp.sum(h_t * lay.cols(Ct), axis=1) + Dv * uu
                        gys, dz = _gate(gys, lay.load_row(z_s.at[t]), y_pre, lay)
                        dz_s[slot, t] = dz.astype(dz_s.dtype)
                    lam = G + lay.rows(gys) * lay.cols(Ct)  # dL/dh_t
                    if shuffle:
                        pc, pb = lay.rows(gys) * h_t, lay.rows(dt * uu) * lam
                        _warp_sums(pc, pb, x_s, t, n, interpret)
                    elif j % R == R - 1:
                        plgpu.commit_smem()  # the last round's reads of x_s are done
                    # Per-thread dC, dB products, stored transposed (state-major rows, one column
                    # per thread) so that the stores are bank-conflict free.
                    jj = j % R
                    if not shuffle:
                        x_s.at[pl.ds(jj * n, n), pl.ds(0, w)].T[...] = lay.rows(gys) * h_t
                        x_s.at[pl.ds((R + jj) * n, n), pl.ds(0, w)].T[...] = lay.rows(dt * uu) * lam
                    if not shuffle and jj == 0:
                        # Sum over channels: in the WGMMA layout a warp owns 16 whole rows, so
                        # the sum is 32 adds and 2 shuffles per row, no cross-warp step.
                        plgpu.commit_smem()
                        x = plgpu.load(
                            x_s.at[:, pl.ds(0, w)], layout=plgpu.Layout.WGMMA, optimized=False
                        )
                        dbc_s[slot, pl.ds((t // R) * 2 * R * n, 2 * R * n)] = jnp.sum(x, axis=1)
                    s = jnp.sum(lam * lay.cols(Bt), axis=1)  # dL/d(dt u)
                    # Same value as in the recompute above; the compiler merges the two (keeping
                    # it in a list compiled to identical registers and spills; NOTES.md, 4b).
                    a = lay.decay(dt, A_r, rt)
                    g_da = lam * h_prev * a  # dL/d(dt A); 0 at a segment start (a = 0)
                    # A_r is A log2(e): sum(g_da A) = ln 2 sum(g_da A_r).
                    d_dt = (uu * s + cm.LN2 * jnp.sum(g_da * A_r, axis=1)) * ddt
                    du_s[slot, t] = (dt * s + Dv * gys).astype(du_s.dtype)
                    dd_s[slot, t] = d_dt.astype(dd_s.dtype)
                    dA_acc = dA_acc + g_da * lay.rows(dt)
                    dD_acc = dD_acc + gys * uu
                    db_acc = db_acc + d_dt
                    G = a * lam
            if shuffle:
                # Sum the four warps' partial sums of the whole tile: every thread adds 4 rows
                # of T 2n / 128 contiguous values.
                plgpu.commit_smem()
                dbc_s[slot] = x_s[0] + x_s[1] + x_s[2] + x_s[3]
            plgpu.commit_smem()
            rows_sl = pl.ds(tile_idx * T, T)
            plgpu.copy_smem_to_gmem(du_s.at[slot], du_g.at[bi, rows_sl, pl.ds(e0, w)])
            plgpu.copy_smem_to_gmem(dd_s.at[slot], dd_g.at[bi, rows_sl, pl.ds(e0, w)])
            if has_z:
                plgpu.copy_smem_to_gmem(dz_s.at[slot], dz_g.at[bi, rows_sl, pl.ds(e0, w)])
            flat_sl = pl.ds(tile_idx * T * 2 * n, T * 2 * n)
            plgpu.copy_smem_to_gmem(dbc_s.at[slot], dbc_g.at[bi, eb, flat_sl])
            return G, dA_acc, dD_acc, db_acc

        tok = pl.BlockSpec((None, T, w), lambda i: (bi, last - i, eb))
        bc = pl.BlockSpec((None, T, None, n), lambda i: (bi, last - i, eb // epg, 0))
        ck = pl.BlockSpec((None, None, w, n), lambda i: (bi, last - i, eb, 0))
        specs = [tok, tok] + ([tok] if has_z else []) + [bc, bc, tok, ck]
        ops = (u_g, d_g) + ((z_g,) if has_z else ()) + (B_g, C_g, gy_g, ck_g)
        if has_reset:
            specs.append(cm.reset_spec(plan, bi, lambda i: last - i))
            ops += (R_g,)
        init = (G0, lay.zeros_state(), lay.zeros_row(), lay.zeros_row())
        G, dA_acc, dD_acc, db_acc = plgpu.emit_pipeline(
            body, grid=(tpc,), in_specs=specs, max_concurrent_steps=plan.stages, init_carry=init
        )(*ops)
        plgpu.wait_smem_to_gmem(0)
        plgpu.commit_smem()  # the sub_s slots are reused below
        sub_s[0] = dA_acc
        sub_s[1] = G
        vec_s[0] = dD_acc
        vec_s[1] = db_acc
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(sub_s.at[0], dA_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.copy_smem_to_gmem(sub_s.at[1], dh_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.copy_smem_to_gmem(vec_s.at[0], dD_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.copy_smem_to_gmem(vec_s.at[1], dbias_g.at[bi, ci, pl.ds(e0, w)])
        plgpu.wait_smem_to_gmem(0)

    b, c, e, L = plan.b, plan.n_chunks, plan.e_pad, plan.length_pad
    f32 = jnp.float32
    out_type = [
        jax.ShapeDtypeStruct((b, L, e), du_dtype),
        jax.ShapeDtypeStruct((b, L, e), dd_dtype),
    ]
    scratch = [plgpu.SMEM((2, T, w), du_dtype), plgpu.SMEM((2, T, w), dd_dtype)]
    if has_z:
        out_type.append(jax.ShapeDtypeStruct((b, L, e), z.dtype))
        scratch.append(plgpu.SMEM((2, T, w), z.dtype))
    out_type += [
        jax.ShapeDtypeStruct((b, n_eblocks, c * tpc * T * 2 * n), f32),
        jax.ShapeDtypeStruct((b, c, e, n), f32),
        jax.ShapeDtypeStruct((b, c, e), f32),
        jax.ShapeDtypeStruct((b, c, e), f32),
        jax.ShapeDtypeStruct((b, c, e, n), f32),
    ]
    scratch += [
        plgpu.SMEM((2, T * 2 * n), f32),
        plgpu.SMEM((max(T // K - 1, 2), w, n), f32),
        plgpu.SMEM((2, w), f32),
        # shuffle: each warp's partial sums for the tile. smem: the products of one round, rows
        # padded by 8 words so the WGMMA-layout loads spread over the banks.
        plgpu.SMEM((W // 32, T * 2 * n), f32) if shuffle else plgpu.SMEM((2 * R * n, w + 8), f32),
    ]
    ops = (u, delta) + ((z,) if has_z else ()) + (B, C, gy, ckpt)
    ops += ((reset,) if has_reset else ()) + (A, D, bias, G_end)
    return plgpu.kernel(
        kernel,
        out_type=tuple(out_type),
        scratch_types=scratch,
        grid=(b, n_eblocks, c),
        grid_names=("b", "e", "c"),
        compiler_params=cm.compiler_params(),
        interpret=cm.interpret_params(interpret),
        kernel_name="selective_scan_bwd",
    )(*ops)


def backward(u, delta, z, B, C, A, D, bias, ckpt, gy, gh, plan: cm.Plan, *,
             delta_softplus, grad_dtype=None, reset=None, interpret=False):  # fmt: skip
    """All gradients on padded operands. A is pre-scaled by log2(e), as for `forward`; dA is the
    gradient with respect to the unscaled A. gy: (b, l, e) cotangent of y; gh: (b, e, n) of the final
    state; ckpt: the forward's state at every tile start (b, n_tiles, e, n). Runs under
    plan.backward(), whose chunks need not be the forward's. reset: None or the forward's
    (b, l_pad, 4) segment reset offsets. Returns (du, d_delta, dz or None, dB, dC (b, l, g, n)
    f32, dA, dD, d_bias, dh0)."""
    plan = plan.backward()
    if plan.n_chunks > 1:
        kw = dict(delta_softplus=delta_softplus, reset=reset, interpret=interpret)
        g_loc, dt_sum = adjoint_pass(delta, z, gy, C, A, bias, plan, **kw)  # chunks 1 .. c - 1
        decay = jnp.exp2(dt_sum[..., None] * A)  # (b, c - 1, e, n)
        if reset is not None:
            decay = decay * cm.chunk_alive(reset, plan.n_chunks)[:, 1:, None, None]
        # G at chunk k's end is G at chunk k + 1's start: chunk_combine over the chunks in
        # reverse, from gh, with one chunk beyond the first (its maps are never used).
        flip = lambda x: jnp.flip(jnp.pad(x, [(0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 2)), axis=1)
        G_end = jnp.flip(cm.chunk_combine(flip(decay), flip(g_loc), gh), axis=1)
    else:
        G_end = gh[:, None]
    outs = main_pass(
        u, delta, z, B, C, gy, ckpt, A, D, bias, G_end, plan, delta_softplus=delta_softplus,
        grad_dtype=grad_dtype, reset=reset, interpret=interpret,
    )  # fmt: skip
    du, dd = outs[0], outs[1]
    dz, rest = (outs[2], outs[3:]) if z is not None else (None, outs[2:])
    dbc, dAp, dDp, dbp, dhs = rest
    b, L, n, g = plan.b, plan.length_pad, plan.n_pad, plan.g
    R = dbc_round(plan)
    # (b, e_blocks, l_pad / R, 2, R, n) -> per group, blocks summed in a fixed order.
    epg = plan.e_pad // cm.Lanes(plan.bwd_lanes, n).w // g
    dbc = dbc.reshape(b, g, epg, -1, 2, R, n).sum(2)
    dbc = jnp.moveaxis(dbc, 3, 0).reshape(2, b, g, L, n)  # (2, b, g, l_pad, n)
    dC, dB = jnp.moveaxis(dbc, 2, 3)  # (b, l, g, n) each
    return (du, dd, dz, dB, dC, dAp.sum((0, 1)), dDp.sum((0, 1)), dbp.sum((0, 1)), dhs[:, 0])
