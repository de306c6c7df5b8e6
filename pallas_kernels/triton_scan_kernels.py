"""Triton kernels of the selective scan (called from `pallas_kernels.triton_scan`).

Every kernel runs one program per (channel block, sequence split, batch row): grid axis 0 walks
the channel blocks, axis 1 the splits of the sequence, axis 2 the batch. A channel block never
straddles two B/C groups: with p = e // g channels per group, block i covers channels
group * p + j for j in [(i % NB) * BE, (i % NB + 1) * BE) and j < p, group = i // NB, so each
program reads one (T, n) tile of B and C per chunk.

Inside a program the sequence is walked in chunks of T tokens. A chunk's states are a
(BE, NP, T) tile (channels, state index padded to a power of two, time), computed by an
associative scan over time of the affine maps h -> a_t h + b_t, a_t = exp(dt_t A) (times 0 where
a new segment starts) and b_t = dt_t u_t B_t, applied to the state carried in from the previous
chunk. Padded channels, state entries and tokens past the end are identity steps (dt = 0, A = 0,
B = 0), so they never disturb the real ones, and stores are masked.

Kernels:
  _fwd_local_kernel  per split, the map h_end = P h_start + S from zero (for splitting the
                     sequence across programs; the splits are then chained in JAX).
  _fwd_kernel        y, the end state of each split, and optionally the state at every chunk
                     start (the checkpoints of the backward).
  _bwd_local_kernel  per split, the adjoint map lam_start = P' lam_after + Q from zero.
  _bwd_kernel        recomputes each chunk's states from its checkpoint, runs the adjoint
                     recurrence lam_t = C_t gy_t + a_{t+1} lam_{t+1} backwards (a reverse
                     associative scan; a_{t+1} is recomputed from the next token's delta), and
                     writes du, d_delta, dz, per-block partial sums of dB and dC, and per-program
                     partial sums of dA, dD and d_delta_bias. No atomics: the partial sums are
                     added up in JAX, so gradients are deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def _affine_combine(a_first, b_first, a_second, b_second):
    """Composes h -> a_first h + b_first, then h -> a_second h + b_second."""
    return a_first * a_second, b_first * a_second + b_second


@triton.jit
def _step_size(x, SOFTPLUS: tl.constexpr):
    """dt from delta + delta_bias: softplus(x) (x itself above 20) or x."""
    if SOFTPLUS:
        x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    return x


@triton.jit
def _block_indices(E, N, P, NB, BE: tl.constexpr, NP: tl.constexpr):
    """This program's group, channel indices (BE,), channel mask, state indices (NP,), and mask."""
    pid_e = tl.program_id(0)
    grp = pid_e // NB
    j = (pid_e % NB) * BE + tl.arange(0, BE)
    mask_e = j < P
    ch = grp * P + j
    k = tl.arange(0, NP)
    mask_n = k < N
    return grp, ch, mask_e, k, mask_n


@triton.jit
def _chunk_decay(delta_ptr, keep_ptr, bias, A, row, ch, m2, mask_t,
                 E, HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr):  # fmt: skip
    """For the tokens `row` (T,) of this batch row: dt (BE, T), the pre-softplus x (BE, T), and
    the decay a (BE, NP, T); masked tokens and channels get dt = 0 and a = 1."""
    x = tl.load(delta_ptr + row[None, :] * E + ch[:, None], mask=m2, other=0.0).to(tl.float32)
    x = x + bias[:, None]
    dt = tl.where(m2, _step_size(x, SOFTPLUS), 0.0)
    a = tl.exp(dt[:, None, :] * A[:, :, None])
    if HAS_SEG:
        keep = tl.load(keep_ptr + row, mask=mask_t, other=1.0)
        a = a * keep[None, None, :]
    return dt, x, a


@triton.jit
def _fwd_local_kernel(
    u_ptr, delta_ptr, b_ptr, a_ptr, bias_ptr, keep_ptr,
    p_ptr, s_ptr,
    L, E, N, G, P, NB, NC, CPS, NSPLIT,
    BE: tl.constexpr, NP: tl.constexpr, T: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """p, s: (b, NSPLIT, e, n) fp32, the split's end state is p * (its start state) + s."""
    grp, ch, mask_e, k, mask_n = _block_indices(E, N, P, NB, BE, NP)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    mask_en = mask_e[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + ch[:, None] * N + k[None, :], mask=mask_en, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=mask_e, other=0.0)
    tt = tl.arange(0, T)
    last = (tt == T - 1)[None, None, :]
    h = tl.zeros((BE, NP), tl.float32)
    prod = tl.full((BE, NP), 1.0, tl.float32)
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for c in range(c_lo, c_hi):
        t = c * T + tt
        mask_t = t < L
        row = bi * L + t
        m2 = mask_e[:, None] & mask_t[None, :]
        u = tl.load(u_ptr + row[None, :] * E + ch[:, None], mask=m2, other=0.0).to(tl.float32)
        dt, x, a = _chunk_decay(delta_ptr, keep_ptr, bias, A, row, ch, m2, mask_t, E, HAS_SEG,
                                SOFTPLUS)  # fmt: skip
        mbc = mask_n[:, None] & mask_t[None, :]
        Bt = tl.load(b_ptr + (row[None, :] * G + grp) * N + k[:, None], mask=mbc, other=0.0)
        bx = (dt * u)[:, None, :] * Bt.to(tl.float32)[None, :, :]
        acum, bcum = tl.associative_scan((a, bx), 2, _affine_combine)
        hs = acum * h[:, :, None] + bcum
        h = tl.sum(tl.where(last, hs, 0.0), axis=2)
        prod = prod * tl.sum(tl.where(last, acum, 0.0), axis=2)
    off = (bi * NSPLIT + sp) * E * N + ch[:, None] * N + k[None, :]
    tl.store(p_ptr + off, prod, mask=mask_en)
    tl.store(s_ptr + off, h, mask=mask_en)


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, keep_ptr, h0_ptr,
    y_ptr, hend_ptr, ckpt_ptr,
    L, E, N, G, P, NB, NC, CPS, NSPLIT,
    BE: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr,
):  # fmt: skip
    """h0, hend: (b, NSPLIT, e, n) fp32 start / end state of each split; y: (b, L, e);
    ckpt: (b, NC, e, n) fp32, the state before each chunk (written when SAVE)."""
    grp, ch, mask_e, k, mask_n = _block_indices(E, N, P, NB, BE, NP)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    mask_en = mask_e[:, None] & mask_n[None, :]
    state_off = ch[:, None] * N + k[None, :]
    A = tl.load(a_ptr + state_off, mask=mask_en, other=0.0)
    Dv = tl.load(d_ptr + ch, mask=mask_e, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=mask_e, other=0.0)
    tt = tl.arange(0, T)
    last = (tt == T - 1)[None, None, :]
    split_off = (bi * NSPLIT + sp) * E * N + state_off
    h = tl.load(h0_ptr + split_off, mask=mask_en, other=0.0)
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for c in range(c_lo, c_hi):
        if SAVE:
            tl.store(ckpt_ptr + (bi * NC + c) * E * N + state_off, h, mask=mask_en)
        t = c * T + tt
        mask_t = t < L
        row = bi * L + t
        m2 = mask_e[:, None] & mask_t[None, :]
        x_off = row[None, :] * E + ch[:, None]
        u = tl.load(u_ptr + x_off, mask=m2, other=0.0).to(tl.float32)
        dt, x, a = _chunk_decay(delta_ptr, keep_ptr, bias, A, row, ch, m2, mask_t, E, HAS_SEG,
                                SOFTPLUS)  # fmt: skip
        mbc = mask_n[:, None] & mask_t[None, :]
        bc_off = (row[None, :] * G + grp) * N + k[:, None]
        Bt = tl.load(b_ptr + bc_off, mask=mbc, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + bc_off, mask=mbc, other=0.0).to(tl.float32)
        bx = (dt * u)[:, None, :] * Bt[None, :, :]
        acum, bcum = tl.associative_scan((a, bx), 2, _affine_combine)
        hs = acum * h[:, :, None] + bcum
        h = tl.sum(tl.where(last, hs, 0.0), axis=2)
        y = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
        if HAS_Z:
            zz = tl.load(z_ptr + x_off, mask=m2, other=0.0).to(tl.float32)
            y = y * zz / (1.0 + tl.exp(-zz))
        tl.store(y_ptr + x_off, y.to(y_ptr.dtype.element_ty), mask=m2)
    tl.store(hend_ptr + split_off, h, mask=mask_en)


@triton.jit
def _gate_grad(gout_ptr, z_ptr, x_off, m2, HAS_Z: tl.constexpr):
    """The output cotangent (BE, T) fp32, the cotangent of y before the gate, and sigmoid(z)."""
    g = tl.load(gout_ptr + x_off, mask=m2, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + x_off, mask=m2, other=0.0).to(tl.float32)
        sz = 1.0 / (1.0 + tl.exp(-zz))
        gy = g * zz * sz
    else:
        zz = g
        sz = g
        gy = g
    return g, gy, zz, sz


@triton.jit
def _bwd_local_kernel(
    delta_ptr, z_ptr, gout_ptr, c_ptr, a_ptr, bias_ptr, keep_ptr,
    p_ptr, q_ptr,
    L, E, N, G, P, NB, NC, CPS, NSPLIT,
    BE: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """p, q: (b, NSPLIT, e, n) fp32: lam at the split's first token is p * lam_after + q, where
    lam_after is lam at the first token after the split (the final-state cotangent after the
    last token)."""
    grp, ch, mask_e, k, mask_n = _block_indices(E, N, P, NB, BE, NP)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    mask_en = mask_e[:, None] & mask_n[None, :]
    A = tl.load(a_ptr + ch[:, None] * N + k[None, :], mask=mask_en, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=mask_e, other=0.0)
    tt = tl.arange(0, T)
    first = (tt == 0)[None, None, :]
    lam = tl.zeros((BE, NP), tl.float32)
    prod = tl.full((BE, NP), 1.0, tl.float32)
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        t = c * T + tt
        mask_t = t < L
        row = bi * L + t
        m2 = mask_e[:, None] & mask_t[None, :]
        x_off = row[None, :] * E + ch[:, None]
        mask_tn = (t + 1) < L
        m2n = mask_e[:, None] & mask_tn[None, :]
        dtn, xn, an = _chunk_decay(delta_ptr, keep_ptr, bias, A, row + 1, ch, m2n, mask_tn, E,
                                   HAS_SEG, SOFTPLUS)  # fmt: skip
        g, gy, zz, sz = _gate_grad(gout_ptr, z_ptr, x_off, m2, HAS_Z)
        mbc = mask_n[:, None] & mask_t[None, :]
        Ct = tl.load(c_ptr + (row[None, :] * G + grp) * N + k[:, None], mask=mbc, other=0.0)
        r = gy[:, None, :] * Ct.to(tl.float32)[None, :, :]
        cp, v = tl.associative_scan((an, r), 2, _affine_combine, reverse=True)
        lam = tl.sum(tl.where(first, cp * lam[:, :, None] + v, 0.0), axis=2)
        prod = prod * tl.sum(tl.where(first, cp, 0.0), axis=2)
    off = (bi * NSPLIT + sp) * E * N + ch[:, None] * N + k[None, :]
    tl.store(p_ptr + off, prod, mask=mask_en)
    tl.store(q_ptr + off, lam, mask=mask_en)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, z_ptr, gout_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, keep_ptr,
    ckpt_ptr, lam_ptr,
    du_ptr, ddelta_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr, lam0_ptr,
    L, E, N, G, P, NB, NC, CPS, NSPLIT, BATCH,
    BE: tl.constexpr, NP: tl.constexpr, T: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """ckpt: (b, NC, e, n) state before each chunk; lam: (b, NSPLIT, e, n), lam at the first
    token after each split. Writes du, ddelta, dz (b, L, e); db, dc: (blocks, b, L, n) partial
    sums over the block's channels; da: (b, NSPLIT, e, n), dd, dbias: (b, NSPLIT, e) partial
    sums over the split's tokens; lam0: (b, NSPLIT, e, n), lam at the split's first token."""
    grp, ch, mask_e, k, mask_n = _block_indices(E, N, P, NB, BE, NP)
    pid_e = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    mask_en = mask_e[:, None] & mask_n[None, :]
    state_off = ch[:, None] * N + k[None, :]
    A = tl.load(a_ptr + state_off, mask=mask_en, other=0.0)
    Dv = tl.load(d_ptr + ch, mask=mask_e, other=0.0)
    bias = tl.load(bias_ptr + ch, mask=mask_e, other=0.0)
    tt = tl.arange(0, T)
    first = (tt == 0)[None, None, :]
    split_off = (bi * NSPLIT + sp) * E * N + state_off
    lam = tl.load(lam_ptr + split_off, mask=mask_en, other=0.0)
    da_acc = tl.zeros((BE, NP), tl.float32)
    dd_acc = tl.zeros((BE,), tl.float32)
    dbias_acc = tl.zeros((BE,), tl.float32)
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        t = c * T + tt
        mask_t = t < L
        row = bi * L + t
        m2 = mask_e[:, None] & mask_t[None, :]
        x_off = row[None, :] * E + ch[:, None]
        # Recompute the chunk's states from the checkpoint.
        u = tl.load(u_ptr + x_off, mask=m2, other=0.0).to(tl.float32)
        dt, x, a = _chunk_decay(delta_ptr, keep_ptr, bias, A, row, ch, m2, mask_t, E, HAS_SEG,
                                SOFTPLUS)  # fmt: skip
        mbc = mask_n[:, None] & mask_t[None, :]
        bc_off = (row[None, :] * G + grp) * N + k[:, None]
        Bt = tl.load(b_ptr + bc_off, mask=mbc, other=0.0).to(tl.float32)
        Ct = tl.load(c_ptr + bc_off, mask=mbc, other=0.0).to(tl.float32)
        dtu = dt * u
        bx = dtu[:, None, :] * Bt[None, :, :]
        h0 = tl.load(ckpt_ptr + (bi * NC + c) * E * N + state_off, mask=mask_en, other=0.0)
        acum, bcum = tl.associative_scan((a, bx), 2, _affine_combine)
        hs = acum * h0[:, :, None] + bcum
        # The adjoint: lam_t = C_t gy_t + a_{t+1} lam_{t+1}, lam after the chunk carried in.
        mask_tn = (t + 1) < L
        m2n = mask_e[:, None] & mask_tn[None, :]
        dtn, xn, an = _chunk_decay(delta_ptr, keep_ptr, bias, A, row + 1, ch, m2n, mask_tn, E,
                                   HAS_SEG, SOFTPLUS)  # fmt: skip
        g, gy, zz, sz = _gate_grad(gout_ptr, z_ptr, x_off, m2, HAS_Z)
        r = gy[:, None, :] * Ct[None, :, :]
        cp, v = tl.associative_scan((an, r), 2, _affine_combine, reverse=True)
        lam_t = cp * lam[:, :, None] + v
        lam = tl.sum(tl.where(first, lam_t, 0.0), axis=2)
        # Gradients. a_t h_{t-1} = h_t - b_t, so no shifted copy of the states is needed.
        part_off = ((pid_e * BATCH + bi) * L + t[None, :]) * N + k[:, None]
        tl.store(dc_ptr + part_off, tl.sum(gy[:, None, :] * hs, axis=0), mask=mbc)
        tl.store(db_ptr + part_off, tl.sum(dtu[:, None, :] * lam_t, axis=0), mask=mbc)
        s = tl.sum(lam_t * Bt[None, :, :], axis=1)
        g_da = lam_t * (hs - bx)
        g_dt = u * s + tl.sum(g_da * A[:, :, None], axis=1)
        da_acc += tl.sum(g_da * dt[:, None, :], axis=2)
        du = dt * s + gy * Dv[:, None]
        if SOFTPLUS:
            g_dt = tl.where(x > 20.0, g_dt, g_dt / (1.0 + tl.exp(-x)))
        g_dt = tl.where(m2, g_dt, 0.0)
        dbias_acc += tl.sum(g_dt, axis=1)
        dd_acc += tl.sum(gy * u, axis=1)
        tl.store(du_ptr + x_off, du.to(du_ptr.dtype.element_ty), mask=m2)
        tl.store(ddelta_ptr + x_off, g_dt.to(ddelta_ptr.dtype.element_ty), mask=m2)
        if HAS_Z:
            y_pre = tl.sum(hs * Ct[None, :, :], axis=1) + Dv[:, None] * u
            dz = g * y_pre * sz * (1.0 + zz * (1.0 - sz))
            tl.store(dz_ptr + x_off, dz.to(dz_ptr.dtype.element_ty), mask=m2)
    tl.store(da_ptr + split_off, da_acc, mask=mask_en)
    tl.store(lam0_ptr + split_off, lam, mask=mask_en)
    vec_off = (bi * NSPLIT + sp) * E + ch
    tl.store(dd_ptr + vec_off, dd_acc, mask=mask_e)
    tl.store(dbias_ptr + vec_off, dbias_acc, mask=mask_e)
