"""Triton kernels of the selective scan (called from `pallas_kernels.triton_scan`).

Every kernel runs one program per (channel block, sequence split, batch row): grid axis 0 walks
the channel blocks, axis 1 the splits of the sequence, axis 2 the batch. A channel block never
straddles two B/C groups: with p = e // g channels per group, block i covers channels
group * p + j for j in [(i % NB) * BE, (i % NB + 1) * BE) and j < p, group = i // NB, so each
program reads one (n,) row of B and C per token.

A program holds the state of its channels as an (NP, BE) fp32 register tile (state index padded
to a power of two x channels: a thread owns channels, their state entries in its registers) and walks its tokens one at a time, the recurrence
h_t = a_t h_{t-1} + dt_t u_t B_t with a_t = exp2(dt_t A') (A' = A log2(e), scaled in JAX), times
0 where a new segment starts (its exponent offset is -inf there, 0 elsewhere). The tokens come in
chunks of K: a chunk's inputs are loaded into registers first (tuples of per-token vectors,
unrolled with tl.static_range) and the next chunk's are loaded before the current one is
computed, so the loads' latency overlaps the arithmetic. Padded channels and state entries stay
at zero (u = 0, B = C = 0, A = 0) and tokens past the end are identity steps (dt = 0); stores are
masked.

Kernels:
  _fwd_local_kernel  per split, the map h_end = P h_start + S from zero (for splitting the
                     sequence across programs; the splits are then chained in JAX).
  _fwd_kernel        y, the end state of each split, and optionally the state before every
                     chunk (the checkpoints of the backward).
  _bwd_local_kernel  per split, the adjoint map carry_out = P' carry_in + Q from zero, carry
                     being a_t lam_t at the split's first token (what flows to the token before).
  _bwd_kernel        walks the chunks in reverse: recomputes a chunk's K states from its
                     checkpoint into registers, then runs the adjoint recurrence
                     lam_t = C_t gy_t + a_{t+1} lam_{t+1} backwards over them and writes du,
                     d_delta, dz, per-block partial sums of dB and dC, and per-program partial
                     sums of dA, dD and d_delta_bias. No atomics: the partial sums are added up
                     in JAX, so gradients are deterministic.
"""

import triton
import triton.language as tl

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _step_size(x, SOFTPLUS: tl.constexpr):
    """dt from delta + delta_bias: softplus(x) (x itself above 20) or x."""
    if SOFTPLUS:
        x = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    return x


@triton.jit
def _block_indices(E: tl.constexpr, P: tl.constexpr, NB: tl.constexpr, BE: tl.constexpr,
                   NP: tl.constexpr):  # fmt: skip
    """This program's group, channel indices (BE,), channel mask, the (NP, BE) offsets of its
    state entries in an (NP, e) array, and their mask."""
    pid_e = tl.program_id(0)
    grp = pid_e // NB
    j = (pid_e % NB) * BE + tl.arange(0, BE)
    mask_e = j < P
    ch = grp * P + j
    state_off = tl.arange(0, NP)[:, None] * E + ch[None, :]
    # Full-shape (not broadcast) masks: Triton's interpreter reads a broadcast mask out of bounds.
    mask_s = (tl.arange(0, NP)[:, None] * 0 + j[None, :]) < P
    return grp, ch, mask_e, state_off, mask_s


@triton.jit
def _bc_row(ptr, words, t, L: tl.constexpr, BC: tl.constexpr, NP: tl.constexpr):
    """One (NP,) fp32 row of B or C from its uint32 words: fp32 values (BC 0), or bf16 pairs
    (BC 1, the low half is the even state index); zeros past the end (t >= L)."""
    # A full-shape mask (a broadcast scalar one trips Triton's interpreter).
    mask = (words * 0 + t) < L
    w = tl.where(mask, tl.load(ptr + words, mask=mask, other=0), 0)
    if BC == 0:
        row = w.to(tl.float32, bitcast=True)
    else:
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & 0xFFFF0000).to(tl.float32, bitcast=True)
        row = tl.reshape(tl.join(lo, hi), (NP,))
    return row


@triton.jit
def _masked(ptr, mask):
    """An fp32 load that is 0 where masked. The where() repeats the mask's zeros because
    Triton's interpreter fills masked lanes from a broadcast `other` it reads out of bounds."""
    return tl.where(mask, tl.load(ptr, mask=mask, other=0.0), 0.0)


@triton.jit
def _bc_words(row, grp, G: tl.constexpr, NP: tl.constexpr, BC: tl.constexpr):
    """Word offsets of one token's B/C row: (b, l, g, NP) values, NP (fp32) or NP / 2 words."""
    W: tl.constexpr = NP if BC == 0 else NP // 2
    return (row * G + grp) * W + tl.arange(0, W)


@triton.jit
def _load_tokens(ptr, c, ch, mask_e, L: tl.constexpr, E: tl.constexpr, K: tl.constexpr):
    """Raw (BE,) rows of one batch row's (l, e) array for chunk c's K tokens (a tuple); 0 past
    the end."""
    out = ()
    for j in tl.static_range(K):
        t = c * K + j
        out = out + (tl.load(ptr + t * E + ch, mask=mask_e & (t < L), other=0.0),)
    return out


@triton.jit
def _load_resets(rst_ptr, bi, c, L: tl.constexpr, K: tl.constexpr, HAS_SEG: tl.constexpr):
    """Chunk c's exponent offsets (-inf at a segment start, else 0), a tuple of scalars."""
    out = ()
    if HAS_SEG:
        for j in tl.static_range(K):
            t = c * K + j
            out = out + (tl.load(rst_ptr + bi * L + t, mask=t < L, other=0.0),)
    return out


@triton.jit
def _decay(dt, A2, rs, j, HAS_SEG: tl.constexpr):
    """a_t = exp2(dt A') (NP, BE), 0 at a segment start."""
    arg = dt[None, :] * A2
    if HAS_SEG:
        arg = arg + rs[j]
    return tl.exp2(arg)


@triton.jit
def _token(us, ds, bias, j, t, mask_e, L: tl.constexpr, SOFTPLUS: tl.constexpr):
    """u, the pre-softplus x, and dt of token j of a chunk (fp32 (BE,)); u = 0 on masked
    channels and past the end, dt = 0 past the end."""
    m = mask_e & (t < L)
    u = tl.where(m, us[j].to(tl.float32), 0.0)
    x = tl.where(m, ds[j].to(tl.float32), 0.0) + bias
    dt = tl.where(t < L, _step_size(x, SOFTPLUS), 0.0)
    return u, x, dt


@triton.jit
def _fwd_local_kernel(
    u_ptr, delta_ptr, b_ptr, a_ptr, bias_ptr, rst_ptr,
    p_ptr, s_ptr,
    L: tl.constexpr, E: tl.constexpr, G: tl.constexpr, P: tl.constexpr, NB: tl.constexpr,
    NC: tl.constexpr, CPS: tl.constexpr, NSPLIT: tl.constexpr, BE: tl.constexpr,
    NP: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, HAS_SEG: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """p, s: (b, NSPLIT, NP, e) fp32, the split's end state is p * (its start state) + s."""
    grp, ch, mask_e, state_off, mask_s = _block_indices(E, P, NB, BE, NP)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    u_p = u_ptr + bi * L * E
    d_p = delta_ptr + bi * L * E
    A2 = _masked(a_ptr + state_off, mask_s)
    bias = _masked(bias_ptr + ch, mask_e)
    h = tl.zeros((NP, BE), tl.float32)
    # The product of the split's decays is exp2(A' sum(dt) + sum(offsets)): one exp2 at the end
    # instead of a multiply per token (an offset of -inf, a segment start, makes it 0).
    dt_sum = tl.zeros((BE,), tl.float32)
    off_sum = 0.0
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    nu = _load_tokens(u_p, c_lo, ch, mask_e, L, E, K)
    nd = _load_tokens(d_p, c_lo, ch, mask_e, L, E, K)
    for c in range(c_lo, c_hi):
        us = nu
        ds = nd
        nu = _load_tokens(u_p, c + 1, ch, mask_e, L, E, K)
        nd = _load_tokens(d_p, c + 1, ch, mask_e, L, E, K)
        rs = _load_resets(rst_ptr, bi, c, L, K, HAS_SEG)
        for j in tl.static_range(K):
            t = c * K + j
            u, x, dt = _token(us, ds, bias, j, t, mask_e, L, SOFTPLUS)
            brow = _bc_row(b_ptr, _bc_words(bi * L + t, grp, G, NP, BC), t, L, BC, NP)
            a = _decay(dt, A2, rs, j, HAS_SEG)
            h = a * h + (dt * u)[None, :] * brow[:, None]
            dt_sum += dt
            if HAS_SEG:
                off_sum += rs[j]
    off = (bi * NSPLIT + sp) * NP * E + state_off
    tl.store(p_ptr + off, tl.exp2(dt_sum[None, :] * A2 + off_sum), mask=mask_s)
    tl.store(s_ptr + off, h, mask=mask_s)


@triton.jit
def _fwd_kernel(
    u_ptr, delta_ptr, z_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, rst_ptr, h0_ptr,
    y_ptr, hend_ptr, ckpt_ptr,
    L: tl.constexpr, E: tl.constexpr, G: tl.constexpr, P: tl.constexpr, NB: tl.constexpr,
    NC: tl.constexpr, CPS: tl.constexpr, NSPLIT: tl.constexpr, BE: tl.constexpr,
    NP: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE: tl.constexpr, CK: tl.constexpr,
    NCK: tl.constexpr,
):  # fmt: skip
    """h0, hend: (b, NSPLIT, NP, e) fp32 start / end state of each split; y: (b, L, e);
    ckpt: (b, NCK, NP, e) fp32, the state before every CK tokens (written when SAVE; CK divides
    K)."""
    grp, ch, mask_e, state_off, mask_s = _block_indices(E, P, NB, BE, NP)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    u_p = u_ptr + bi * L * E
    d_p = delta_ptr + bi * L * E
    z_p = z_ptr + bi * L * E
    y_p = y_ptr + bi * L * E
    A2 = _masked(a_ptr + state_off, mask_s)
    Dv = _masked(d_ptr + ch, mask_e)
    bias = _masked(bias_ptr + ch, mask_e)
    split_off = (bi * NSPLIT + sp) * NP * E + state_off
    h = _masked(h0_ptr + split_off, mask_s)
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    nu = _load_tokens(u_p, c_lo, ch, mask_e, L, E, K)
    nd = _load_tokens(d_p, c_lo, ch, mask_e, L, E, K)
    nz = ()
    if HAS_Z:
        nz = _load_tokens(z_p, c_lo, ch, mask_e, L, E, K)
    for c in range(c_lo, c_hi):
        us = nu
        ds = nd
        zs = nz
        nu = _load_tokens(u_p, c + 1, ch, mask_e, L, E, K)
        nd = _load_tokens(d_p, c + 1, ch, mask_e, L, E, K)
        if HAS_Z:
            nz = _load_tokens(z_p, c + 1, ch, mask_e, L, E, K)
        rs = _load_resets(rst_ptr, bi, c, L, K, HAS_SEG)
        ys = ()
        for j in tl.static_range(K):
            t = c * K + j
            if SAVE:
                if j % CK == 0:
                    ck = (c * K + j) // CK
                    tl.store(ckpt_ptr + (bi * NCK + ck) * NP * E + state_off, h,
                             mask=mask_s)  # fmt: skip
            u, x, dt = _token(us, ds, bias, j, t, mask_e, L, SOFTPLUS)
            words = _bc_words(bi * L + t, grp, G, NP, BC)
            brow = _bc_row(b_ptr, words, t, L, BC, NP)
            crow = _bc_row(c_ptr, words, t, L, BC, NP)
            a = _decay(dt, A2, rs, j, HAS_SEG)
            h = a * h + (dt * u)[None, :] * brow[:, None]
            y = tl.sum(h * crow[:, None], axis=0) + Dv * u
            if HAS_Z:
                zz = tl.where(mask_e & (t < L), zs[j].to(tl.float32), 0.0)
                y = y * zz / (1.0 + tl.exp(-zz))
            ys = ys + (y,)
        for j in tl.static_range(K):
            t = c * K + j
            tl.store(y_p + t * E + ch, ys[j].to(y_ptr.dtype.element_ty), mask=mask_e & (t < L))
    tl.store(hend_ptr + split_off, h, mask=mask_s)


@triton.jit
def _gate(g, zs, j, m, HAS_Z: tl.constexpr):
    """The cotangent of y before the gate, z and sigmoid(z) (g itself when there is no gate)."""
    if HAS_Z:
        zz = tl.where(m, zs[j].to(tl.float32), 0.0)
        sz = 1.0 / (1.0 + tl.exp(-zz))
        gy = g * zz * sz
    else:
        zz = g
        sz = g
        gy = g
    return gy, zz, sz


@triton.jit
def _scatter_sum(x, NP: tl.constexpr, BE: tl.constexpr, R: tl.constexpr):
    """The sums of an (NP, BE) tile's rows over its channels, by recursive halving: in round r
    a channel keeps half of its rows (the upper half where bit r of its index is set) and hands
    the other half to the channel that differs in bit r, adding what it receives. After R rounds
    the (NP >> R, BE) tile is summed over the remaining channel bits. Returns (NP >> R, 2**R):
    element (i, j) is the total of row _scatter_rows(i, j). Exchanging half the rows per round
    costs NP - NP >> R shuffles per channel where a plain sum costs NP log2(BE)."""
    lane = tl.arange(0, BE)
    for r in tl.static_range(R):
        halves = tl.permute(tl.reshape(x, (2, NP >> (r + 1), BE)), (1, 2, 0))
        lo, hi = tl.split(halves)
        up = ((lane >> r) & 1)[None, :] != 0
        send = tl.where(up, lo, hi).to(tl.int32, bitcast=True)
        keep = tl.where(up, hi, lo)
        # The partner's half: the XOR over the pair is mine ^ theirs, exact for any bits.
        pairs = tl.reshape(send, (NP >> (r + 1), BE >> (r + 1), 2, 1 << r))
        both = tl.broadcast_to(tl.expand_dims(tl.xor_sum(pairs, axis=2), 2), pairs.shape)
        recv = tl.reshape(both, (NP >> (r + 1), BE)) ^ send
        x = keep + recv.to(tl.float32, bitcast=True)
    return tl.sum(tl.reshape(x, (NP >> R, BE >> R, 1 << R)), axis=1)


@triton.jit
def _scatter_rows(NP: tl.constexpr, R: tl.constexpr):
    """The row of each element of _scatter_sum's result: i plus, for each round k, NP >> (k + 1)
    where bit k of j is set."""
    j = tl.arange(0, 1 << R)
    rows = tl.arange(0, NP >> R)[:, None] + j[None, :] * 0
    for k in tl.static_range(R):
        rows += ((j >> k) & 1)[None, :] * (NP >> (k + 1))
    return rows


@triton.jit
def _bwd_local_kernel(
    delta_ptr, z_ptr, gout_ptr, c_ptr, a_ptr, bias_ptr, rst_ptr,
    p_ptr, q_ptr,
    L: tl.constexpr, E: tl.constexpr, G: tl.constexpr, P: tl.constexpr, NB: tl.constexpr,
    NC: tl.constexpr, CPS: tl.constexpr, NSPLIT: tl.constexpr, BE: tl.constexpr,
    NP: tl.constexpr, K: tl.constexpr, BC: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    """p, q: (b, NSPLIT, NP, e) fp32: the carry out of the split's first token (a_t lam_t) is
    p * carry_in + q, carry_in being the carry out of the next split's first token (the
    final-state cotangent for the last split)."""
    grp, ch, mask_e, state_off, mask_s = _block_indices(E, P, NB, BE, NP)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    d_p = delta_ptr + bi * L * E
    z_p = z_ptr + bi * L * E
    g_p = gout_ptr + bi * L * E
    A2 = _masked(a_ptr + state_off, mask_s)
    bias = _masked(bias_ptr + ch, mask_e)
    carry = tl.zeros((NP, BE), tl.float32)
    dt_sum = tl.zeros((BE,), tl.float32)  # the decays' product at the end, as in the forward
    off_sum = 0.0
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        ds = _load_tokens(d_p, c, ch, mask_e, L, E, K)
        gs = _load_tokens(g_p, c, ch, mask_e, L, E, K)
        zs = ()
        if HAS_Z:
            zs = _load_tokens(z_p, c, ch, mask_e, L, E, K)
        rs = _load_resets(rst_ptr, bi, c, L, K, HAS_SEG)
        for j in tl.static_range(K - 1, -1, -1):
            t = c * K + j
            _, x, dt = _token(ds, ds, bias, j, t, mask_e, L, SOFTPLUS)
            m = mask_e & (t < L)
            gy, zz, sz = _gate(tl.where(m, gs[j].to(tl.float32), 0.0), zs, j, m, HAS_Z)
            crow = _bc_row(c_ptr, _bc_words(bi * L + t, grp, G, NP, BC), t, L, BC, NP)
            lam = carry + gy[None, :] * crow[:, None]
            a = _decay(dt, A2, rs, j, HAS_SEG)
            carry = a * lam
            dt_sum += dt
            if HAS_SEG:
                off_sum += rs[j]
    off = (bi * NSPLIT + sp) * NP * E + state_off
    tl.store(p_ptr + off, tl.exp2(dt_sum[None, :] * A2 + off_sum), mask=mask_s)
    tl.store(q_ptr + off, carry, mask=mask_s)


@triton.jit
def _bwd_kernel(
    u_ptr, delta_ptr, z_ptr, gout_ptr, b_ptr, c_ptr, a_ptr, d_ptr, bias_ptr, rst_ptr,
    ckpt_ptr, carry_ptr,
    du_ptr, ddelta_ptr, dz_ptr, db_ptr, dc_ptr, da_ptr, dd_ptr, dbias_ptr, carry0_ptr,
    L: tl.constexpr, E: tl.constexpr, G: tl.constexpr, P: tl.constexpr, NB: tl.constexpr,
    NC: tl.constexpr, CPS: tl.constexpr, NSPLIT: tl.constexpr, BATCH: tl.constexpr,
    BE: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, BC: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SEG: tl.constexpr, SOFTPLUS: tl.constexpr, NCK: tl.constexpr,
    SUM_LANES: tl.constexpr, SCATTER: tl.constexpr,
):  # fmt: skip
    """ckpt: (b, NCK, NP, e) state before each chunk (NCK >= NC); carry: (b, NSPLIT, NP, e), the carry into
    each split's last token (a lam of the next token, or the final-state cotangent). Writes du,
    ddelta, dz (b, L, e); db, dc: (blocks * BE / SUM_LANES, b, L, NP) partial sums, each over
    SUM_LANES neighbouring channels of a block (fewer lanes: fewer shuffles, more partials),
    or, when SCATTER > 0, one per block summed by _scatter_sum in SCATTER rounds;
    da: (b, NSPLIT, NP, e), dd, dbias: (b, NSPLIT, e) partial sums over the split's tokens;
    carry0: (b, NSPLIT, NP, e), the carry out of the split's first token (split 0: d h0)."""
    grp, ch, mask_e, state_off, mask_s = _block_indices(E, P, NB, BE, NP)
    pid_e = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1)
    bi = tl.program_id(2).to(tl.int64)
    tok = bi * L * E
    u_p = u_ptr + tok
    d_p = delta_ptr + tok
    z_p = z_ptr + tok
    g_p = gout_ptr + tok
    k = tl.arange(0, NP)
    GR: tl.constexpr = BE // SUM_LANES
    if SCATTER > 0:
        part_off = (pid_e * BATCH + bi) * L * NP + _scatter_rows(NP, SCATTER)
    elif GR == 1:
        part_off = (pid_e * BATCH + bi) * L * NP + k
    else:
        gi = tl.arange(0, GR).to(tl.int64)
        part_off = (((pid_e * GR + gi[None, :]) * BATCH + bi) * L * NP) + k[:, None]
    part_p = db_ptr + part_off
    partc_p = dc_ptr + part_off
    A2 = _masked(a_ptr + state_off, mask_s)
    Dv = _masked(d_ptr + ch, mask_e)
    bias = _masked(bias_ptr + ch, mask_e)
    split_off = (bi * NSPLIT + sp) * NP * E + state_off
    carry = _masked(carry_ptr + split_off, mask_s)
    da_acc = tl.zeros((NP, BE), tl.float32)
    dd_acc = tl.zeros((BE,), tl.float32)
    dbias_acc = tl.zeros((BE,), tl.float32)
    c_lo = sp * CPS
    c_hi = tl.minimum(c_lo + CPS, NC)
    for i in range(0, c_hi - c_lo):
        c = c_hi - 1 - i
        us = _load_tokens(u_p, c, ch, mask_e, L, E, K)
        ds = _load_tokens(d_p, c, ch, mask_e, L, E, K)
        gs = _load_tokens(g_p, c, ch, mask_e, L, E, K)
        zs = ()
        if HAS_Z:
            zs = _load_tokens(z_p, c, ch, mask_e, L, E, K)
        rs = _load_resets(rst_ptr, bi, c, L, K, HAS_SEG)
        # Recompute the chunk's states from its checkpoint (K register tiles).
        h = _masked(ckpt_ptr + (bi * NCK + c) * NP * E + state_off, mask_s)
        hs = ()
        for j in tl.static_range(K):
            t = c * K + j
            u, x, dt = _token(us, ds, bias, j, t, mask_e, L, SOFTPLUS)
            brow = _bc_row(b_ptr, _bc_words(bi * L + t, grp, G, NP, BC), t, L, BC, NP)
            a = _decay(dt, A2, rs, j, HAS_SEG)
            h = a * h + (dt * u)[None, :] * brow[:, None]
            hs = hs + (h,)
        # The adjoint, backwards over the chunk.
        for j in tl.static_range(K - 1, -1, -1):
            t = c * K + j
            m = mask_e & (t < L)
            u, x, dt = _token(us, ds, bias, j, t, mask_e, L, SOFTPLUS)
            g = tl.where(m, gs[j].to(tl.float32), 0.0)
            gy, zz, sz = _gate(g, zs, j, m, HAS_Z)
            words = _bc_words(bi * L + t, grp, G, NP, BC)
            bt = _bc_row(b_ptr, words, t, L, BC, NP)[:, None]
            ct = _bc_row(c_ptr, words, t, L, BC, NP)[:, None]
            dtu = dt * u
            lam = carry + gy[None, :] * ct
            ht = hs[j]
            # a_t h_{t-1} = h_t - dt u B_t: the previous state is not needed.
            g_a = lam * (ht - dtu[None, :] * bt)
            da_acc += g_a * dt[None, :]
            s = tl.sum(lam * bt, axis=0)
            g_dt = u * s + tl.sum(g_a * A2, axis=0) * LN2
            du = dt * s + gy * Dv
            if SOFTPLUS:
                g_dt = tl.where(x > 20.0, g_dt, g_dt / (1.0 + tl.exp(-x)))
            g_dt = tl.where(m, g_dt, 0.0)
            dbias_acc += g_dt
            dd_acc += gy * u
            tl.store(du_ptr + tok + t * E + ch, du.to(du_ptr.dtype.element_ty), mask=m)
            tl.store(ddelta_ptr + tok + t * E + ch, g_dt.to(ddelta_ptr.dtype.element_ty), mask=m)
            if HAS_Z:
                y_pre = tl.sum(ht * ct, axis=0) + Dv * u
                dz = g * y_pre * sz * (1.0 + zz * (1.0 - sz))
                tl.store(dz_ptr + tok + t * E + ch, dz.to(dz_ptr.dtype.element_ty), mask=m)
            if SCATTER > 0:
                mk = (part_off * 0 + t) < L
                tl.store(partc_p + t * NP, _scatter_sum(gy[None, :] * ht, NP, BE, SCATTER), mask=mk)
                tl.store(
                    part_p + t * NP, _scatter_sum(dtu[None, :] * lam, NP, BE, SCATTER), mask=mk
                )
            elif GR == 1:
                mk = (k * 0 + t) < L
                tl.store(partc_p + t * NP, tl.sum(gy[None, :] * ht, axis=1), mask=mk)
                tl.store(part_p + t * NP, tl.sum(dtu[None, :] * lam, axis=1), mask=mk)
            else:
                mk = (part_off * 0 + t) < L
                pc = tl.sum(tl.reshape(gy[None, :] * ht, (NP, GR, SUM_LANES)), axis=2)
                pb = tl.sum(tl.reshape(dtu[None, :] * lam, (NP, GR, SUM_LANES)), axis=2)
                tl.store(partc_p + t * NP, pc, mask=mk)
                tl.store(part_p + t * NP, pb, mask=mk)
            carry = _decay(dt, A2, rs, j, HAS_SEG) * lam
    tl.store(da_ptr + split_off, da_acc, mask=mask_s)
    tl.store(carry0_ptr + split_off, carry, mask=mask_s)
    vec_off = (bi * NSPLIT + sp) * E + ch
    tl.store(dd_ptr + vec_off, dd_acc, mask=mask_e)
    tl.store(dbias_ptr + vec_off, dbias_acc, mask=mask_e)
