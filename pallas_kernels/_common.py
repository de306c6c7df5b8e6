"""Pieces shared by the forward and backward selective-scan kernels.

Thread mapping (both directions): one warpgroup (128 threads) per block, one thread per channel.
A thread keeps its channel's n state values in registers, so the recurrence over n is plain
per-thread arithmetic and the C contraction sum_n h C needs no communication. Tokens reach the
block in T-token tiles that the Mosaic GPU pipeline copies into SMEM with TMA ahead of use.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu.fragmented_array import Tiling
from jax.experimental.pallas import mosaic_gpu as plgpu

W = 128  # channels per block: one warpgroup, one thread per channel
# (W, n) arrays with row i in thread i's registers; the reduced layouts are a (W,) vector with one
# element per thread, and an (n,) vector that every thread holds whole.
STATE = plgpu.Layout.TCGEN05_TMEM_NATIVE(1)
ROW = STATE.reduce(1)
COL = STATE.reduce(0)
NUM_SMS_HOPPER = 132
BWD_REDUCE = ("shuffle", "smem")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the scan kernels.

    tile: tokens per pipeline step (one SMEM tile of every (l, e) input).
    sub: tokens whose states the backward keeps in registers at once (divides tile); rounded up to
      a multiple of 32 / n_block, the tokens per channel-sum round of dB and dC.
    chunks: sequence chunks run in parallel, forward and backward (None: automatic, see
      split_below and target_blocks for the forward, bwd_slots for the backward).
    target_blocks: blocks the forward aims for when it splits the sequence automatically.
    bwd_slots: blocks of the backward's main pass the GPU runs at once (two per SM: it sits at
      the 255-register cap). With chunks=None the backward takes, among the chunk counts c (the
      divisors of the tiles) whose blocks fill these slots, the one that runs them in the least
      waves x (L / c + a block's fixed cost, `backward_chunks`), then the fewest (each chunk
      but the first costs an adjoint pass over it). One H200, 2026-12-03, S2 (128 blocks):
      4 chunks 1.314-1.317 ms fwd + bwd against 1.357 for the 8 that aiming at
      792 blocks took; S1 (96 blocks): 8 chunks, 4 would be 1.297 against 1.116 (NOTES.md).
    split_below: with chunks=None, the forward splits the sequence only when batch x channel
      blocks are fewer than this (two thirds of the SMs); the backward always splits (see
      bwd_slots). 0: the forward always splits too.
    unroll: token loops as straight-line code (static token indices), so the compiler overlaps
      the loads and exponentials of a tile's tokens; False keeps a loop per tile.
    stages: input tiles in flight in the TMA pipeline (max_concurrent_steps), at least 2.
    fwd_lanes: threads per channel in the forward kernels, 1 or 2 (as bwd_lanes: 64-channel
      blocks, so twice the blocks, and warps, for the same channels). None: 2 when the forward
      runs in one pass (no sequence split), 1 when it is split. On one H200 (2026-12-03) two
      lanes took S1 / S2 fwd + bwd from 1.25 / 1.53 ms to 1.20 / 1.47 and slowed the split
      S3 / S4 forward (0.81 -> 0.93, 2.32 -> 2.74 ms); see NOTES.md, variant 8b.
    bwd_lanes: threads per channel in the backward's main pass, 1 or 2. With 2, a block takes
      64 channels and each thread holds half of a channel's states, which halves the registers
      the states take (the pass is at the 255 cap with 1); per-channel work is done twice and
      the sums over states need one lane shuffle. Sums over channels always go through SMEM.
    bwd_reduce: how the backward sums the per-channel dB, dC products over a block's channels.
      "smem" (default): the products go to SMEM, state-major (conflict-free stores), and a
      WGMMA-layout load sums them every 32 / n_block tokens.
      "shuffle": per token, a recursive-halving warp shuffle leaves one warp-partial sum per lane
      (31 shuffles for 32 values), parked in SMEM and summed over the 4 warps once per tile;
      measured 2-3% slower than "smem" on H100 (pallas_kernels/NOTES.md). It falls back to
      "smem" when tile * 2 * n_block is not a multiple of 128.
    """

    tile: int = 8
    sub: int | None = None
    chunks: int | None = None
    target_blocks: int = 6 * NUM_SMS_HOPPER
    bwd_reduce: str = "smem"
    split_below: int = 2 * NUM_SMS_HOPPER // 3
    unroll: bool = True
    stages: int = 2
    bwd_lanes: int = 1
    fwd_lanes: int | None = None
    bwd_slots: int = 2 * NUM_SMS_HOPPER

    def __post_init__(self):
        if self.bwd_lanes not in (1, 2):
            raise ValueError(f"BlockSizes: bwd_lanes must be 1 or 2, got {self.bwd_lanes!r}")
        if self.fwd_lanes not in (None, 1, 2):
            raise ValueError(f"BlockSizes: fwd_lanes must be None, 1 or 2, got {self.fwd_lanes!r}")
        if self.bwd_slots < 1:
            raise ValueError(f"BlockSizes: bwd_slots must be at least 1, got {self.bwd_slots}")
        if self.stages < 2:
            raise ValueError(f"BlockSizes: stages={self.stages} must be at least 2")
        if self.sub is not None and (self.tile < 1 or self.sub < 1 or self.tile % self.sub):
            raise ValueError(f"BlockSizes: {self.sub=} must divide {self.tile=}, both positive")
        if self.bwd_reduce not in BWD_REDUCE:
            raise ValueError(f"BlockSizes: bwd_reduce must be one of {BWD_REDUCE}, got "
                             f"{self.bwd_reduce!r}")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static sizes of one call, after padding. e_pad % W == 0 within each group's slice."""

    b: int
    length: int  # true L; tokens at and past it are masked (dt = 0, an identity step)
    e: int
    n: int
    g: int
    e_pad: int
    n_pad: int  # states per kernel block (8 or 16); all n_split blocks together hold n
    tile: int
    sub: int
    n_tiles: int  # tiles covering L
    tiles_per_chunk: int
    n_chunks: int
    n_split: int = 1  # d_state above 16 runs as n_split independent 16-state scans
    bwd_reduce: str = "smem"  # see BlockSizes; resolved (never "shuffle" where it cannot run)
    unroll: bool = False  # token loops unrolled in Python (straight-line code per tile)
    stages: int = 2  # pipeline depth of the input tiles (max_concurrent_steps)
    bwd_chunks: int = 1  # sequence chunks of the backward (n_chunks is the forward's)
    bwd_lanes: int = 1  # threads per channel in the backward's main pass (BlockSizes)
    fwd_lanes: int = 1  # threads per channel in the forward kernels (BlockSizes, resolved)

    def backward(self):
        """The plan the backward kernels run under: the same tiles, its own chunks."""
        return dataclasses.replace(
            self, n_chunks=self.bwd_chunks, tiles_per_chunk=self.n_tiles // self.bwd_chunks
        )

    @property
    def length_pad(self):
        """L rounded up to whole tiles: the (b, l, .) operands are zero-padded to it."""
        return self.n_tiles * self.tile

    @property
    def n_total(self):
        return self.n_pad * self.n_split

    @property
    def n_eblocks(self):
        return self.e_pad // W

    @property
    def eblocks_per_group(self):
        return self.n_eblocks // self.g


def make_plan(b, length, e, n, g, block_sizes: BlockSizes) -> Plan:
    p = e // g
    p_pad = -(-p // W) * W
    # Registers and SMEM hold a thread's states for several tokens, so a block takes at most 16
    # states; TMA rows must be multiples of 16 bytes, so at least 8.
    n_split = 1 if n <= 16 else -(-n // 16)
    n_pad = -(-n // 8) * 8 if n <= 16 else 16
    # The backward sums dB, dC over channels every 32 / n_pad tokens, so sub is a multiple of that.
    rounds = 32 // n_pad
    tile = block_sizes.tile
    sub = block_sizes.sub or (4 if block_sizes.bwd_lanes == 1 else min(block_sizes.tile, 8))
    sub = -(-sub // rounds) * rounds
    if tile % sub:
        raise ValueError(f"BlockSizes: tile={tile} must be a multiple of sub={sub}")
    n_tiles = -(-length // tile)
    blocks = b * g * (p_pad // W)
    # Chunks split the tiles exactly: every TMA copy then stays inside its batch row. (A copy past
    # the end of l is not clipped per dimension once the batch index is folded into the address:
    # it would spill into the next batch row.) Take the divisor of n_tiles nearest the target.
    divisors = [d for d in range(1, n_tiles + 1) if n_tiles % d == 0]
    nearest = lambda c: min(divisors, key=lambda d: (abs(math.log(d / c)), -d))
    # The forward's blocks are 64 channels wide with fwd_lanes 2, 128 otherwise.
    fwd_lanes = block_sizes.fwd_lanes or 1
    fwd_blocks = blocks * fwd_lanes
    split = nearest(max(1, -(-block_sizes.target_blocks // fwd_blocks)))
    if block_sizes.chunks is not None:
        chunks = bwd_chunks = nearest(block_sizes.chunks)
    else:
        # The forward runs in one pass (no state pre-pass, no combine, every exponential once)
        # when batch x channel blocks alone come near to filling the GPU; the backward, at the
        # register cap with two blocks per SM, always splits (NOTES.md, variants 5-6).
        chunks = 1 if fwd_blocks >= block_sizes.split_below > 0 else split
        # The backward's main pass counts blocks of its own width (64 channels with 2 lanes).
        bwd_blocks = blocks * block_sizes.bwd_lanes
        bwd_chunks = backward_chunks(bwd_blocks, n_tiles, tile, divisors, block_sizes.bwd_slots)
    if block_sizes.fwd_lanes is None and chunks == 1:
        # Measured (NOTES.md, variant 8b): unsplit, two lanes take fwd + bwd 4% faster at S1 / S2
        # (the forward alone is unchanged); split, the forward is 16-18% slower with them.
        fwd_lanes = 2
    tiles_per_chunk = n_tiles // chunks
    reduce = block_sizes.bwd_reduce
    if reduce == "shuffle" and ((tile * 2 * n_pad) % W or block_sizes.bwd_lanes > 1):
        reduce = "smem"
    return Plan(b, length, e, n, g, g * p_pad, n_pad, tile, sub, n_tiles, tiles_per_chunk,
                chunks, n_split, reduce, block_sizes.unroll, block_sizes.stages,
                bwd_chunks, block_sizes.bwd_lanes, fwd_lanes)  # fmt: skip


# A block's fixed cost in the backward's chunk choice, in tokens (pipeline fill, loading A and G,
# the final stores): an estimate, not measured. It only breaks near-ties between chunk counts.
BLOCK_OVERHEAD_TOKENS = 32


def backward_chunks(blocks, n_tiles, tile, divisors, slots):
    """Chunks of the backward (BlockSizes.bwd_slots): among the divisors c whose blocks fill the
    `slots` (blocks c >= slots), the one with the least waves x (chunk tokens + a block's fixed
    cost), then the fewest; the most chunks when none fills them."""
    fill = [c for c in divisors if blocks * c >= slots]
    if not fill:
        return max(divisors)
    waves = lambda c: -(-blocks * c // slots)
    return min(fill, key=lambda c: (waves(c) * (n_tiles // c * tile + BLOCK_OVERHEAD_TOKENS), c))


def pad_channels(x, plan: Plan, axis):
    """Pads the channel axis (size e = g * p) to e_pad = g * p_pad so no block straddles a group."""
    if plan.e_pad == plan.e:
        return x
    g = plan.g
    p, p_pad = plan.e // g, plan.e_pad // g
    shape = x.shape
    x = x.reshape(*shape[:axis], g, p, *shape[axis + 1 :])
    widths = [(0, 0)] * x.ndim
    widths[axis + 1] = (0, p_pad - p)
    x = jnp.pad(x, widths)
    return x.reshape(*shape[:axis], g * p_pad, *shape[axis + 1 :])


def unpad_channels(x, plan: Plan, axis):
    if plan.e_pad == plan.e:
        return x
    g = plan.g
    p, p_pad = plan.e // g, plan.e_pad // g
    shape = x.shape
    x = x.reshape(*shape[:axis], g, p_pad, *shape[axis + 1 :])
    x = jax.lax.slice_in_dim(x, 0, p, axis=axis + 1)
    return x.reshape(*shape[:axis], g * p, *shape[axis + 1 :])


def pad_length(x, plan: Plan):
    """Zero-pads axis 1 (l) of a (b, l, ...) operand to whole tiles."""
    if x is None or x.shape[1] == plan.length_pad:
        return x
    return jnp.pad(x, [(0, 0), (0, plan.length_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def pad_last(x, size):
    if x.shape[-1] == size:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, size - x.shape[-1])])


# ----------------------------------------------------------------------------------------------
# In-kernel helpers (Lane semantics: every array carries an explicit layout).


class Lanes:
    """How a block's (w, n) state arrays sit on the warpgroup's 128 threads.

    lanes=1: w = 128 channels, thread i holds channel i's whole state row (STATE above).
    lanes=2: w = 64 channels; each warp holds 16 channels, lanes 2c and 2c + 1 the two halves
    (n / 2 states each) of its channel c. A per-channel (w,) vector is then held by both lanes
    of its channel, and a sum over the states is a per-thread sum plus one lane shuffle."""

    def __init__(self, lanes: int, n: int, interpret=False, gate_dtype=None):
        self.lanes, self.n, self.w = lanes, n, W // lanes
        self.interpret = bool(interpret)
        self.approx_gate = gate_dtype is not None and jnp.dtype(gate_dtype).itemsize < 4
        if lanes == 1:
            self.state, self.row, self.col = STATE, ROW, COL
        else:
            tiling = Tiling(((64, n), (16, n), (16, n // 2), (1,)))
            self.state = plgpu.Layout.TILED(tiling, warp_dims=(-7,), lane_dims=(-3, -4),
                                            vector_dim=-1)  # fmt: skip
            self.row, self.col = self.state.reduce(1), self.state.reduce(0)

    def rows(self, x):
        """(w,) per-channel values -> (w, n), broadcast along each channel's state row."""
        return plgpu.layout_cast(jax.lax.broadcast_in_dim(x, (self.w, self.n), (0,)), self.state)

    def cols(self, x):
        """(n,) per-state values -> (w, n)."""
        return plgpu.layout_cast(jax.lax.broadcast_in_dim(x, (self.w, self.n), (1,)), self.state)

    def load_row(self, ref):
        return plgpu.load(ref, layout=self.row, optimized=False).astype(jnp.float32)

    def load_col(self, ref):
        return plgpu.load(ref, layout=self.col, optimized=False).astype(jnp.float32)

    def load_state(self, ref):
        return plgpu.load(ref, layout=self.state, optimized=False).astype(jnp.float32)

    def zeros_state(self):
        return plgpu.layout_cast(jnp.zeros((self.w, self.n), jnp.float32), self.state)

    def zeros_row(self):
        return plgpu.layout_cast(jnp.zeros((self.w,), jnp.float32), self.row)

    def recip(self, x):
        """1 / x of a (w,) row as one MUFU instruction (PTX rcp.approx.ftz.f32, at most 1 ulp
        off, where a division rounds correctly; subnormal results flush to 0). `1 / x` in a kernel lowers to
        an IEEE division instead: a reciprocal refined by FMAs and a range check that branches
        to a slow path. Interpret mode, which runs no Mosaic GPU code, divides."""
        if self.interpret:
            return 1.0 / x

        @plgpu.inline_mgpu(
            arg_types=(self.row,),
            return_type=plgpu.ShapeDtypeStruct(x.shape, jnp.float32, layout=self.row),
        )
        def rcp(_, a):
            return a._pointwise(mgpu.FragmentedArray._lift_fast_instr("rcp.approx.ftz.f32"))

        return rcp(x)

    def sigmoid(self, x):
        """1 / (1 + e^-x) of a (w,) row: two MUFU instructions (ex2, rcp) and two FP32 ones.
        e^-x = inf gives 0, e^-x = 0 gives 1."""
        return self.recip(1.0 + jnp.exp(-x))

    def gate_sigmoid(self, z):
        """sigmoid(z) for the silu gate z sigmoid(z). With a half-precision z (gate_dtype bf16 or
        fp16) it is 0.5 + 0.5 tanh(z / 2) with the hardware tanh (tanh.approx.f32, relative error
        at most 2^-11): one MUFU instruction and two FP32 ones, absolute error at most 2.5e-4 (a
        sixteenth of the bf16 spacing and half the fp16 spacing just above 0.5); with an fp32 z,
        `sigmoid`. One H200, 2026-12-03, against `sigmoid` everywhere: S2 fwd + bwd 1.432 ->
        1.418 ms (two runs); with this form in d delta as well it was 1.380, and S1 1.164 ->
        1.122 (pallas_kernels/NOTES.md, "the sigmoid"). It is not used for d softplus / d delta =
        sigmoid(delta + bias): that one is mostly far below 0.5, where an absolute error of 2.5e-4
        is a large relative one."""
        if self.approx_gate:
            return 0.5 + 0.5 * jnp.tanh(0.5 * z)
        return self.sigmoid(z)

    def decay(self, dt, A_r, reset=None):
        """exp(dt A) = exp2(dt A'), (w, n), with A_r = A' = A log2(e) pre-scaled.

        reset: None, or the token's segment reset offset (`load_reset`), a scalar every thread
        reads: 0, or -inf where a new segment starts. exp2(dt A' - inf) = 0 zeroes the decay
        there, so the state restarts from zero (forward) and the adjoint stops (backward); dt A'
        + reset is one FMA where dt A' was one FMUL, so the reset costs no arithmetic, only one
        scalar SMEM load."""
        x = self.rows(dt) * A_r
        if reset is not None:
            x = x + reset
        return jnp.exp2(x)


LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def load_reset(ref, t):
    """Token t's reset offset from a (T, RESET_ROW) SMEM tile, a scalar (every thread reads the
    same word, one broadcast load)."""
    return ref[t, 0]


def token_loop(n_tokens, step, carry, unroll):
    """carry = step(t, carry) for t in 0..n_tokens-1: straight-line code with static t when
    unroll (the compiler can then overlap the tokens' loads and exponentials), else a loop."""
    if unroll:
        for t in range(n_tokens):
            carry = step(t, carry)
        return carry
    return jax.lax.fori_loop(0, n_tokens, step, carry)


def softplus(x):
    """mamba_ssm's softplus: x above 20, else log(1 + e^x), written stably for large |x|."""
    return _softplus_parts(x)[0]


def _softplus_parts(x):
    """(softplus(x), e, v) with e = e^-|x| and v = 1 + e: the backward derives sigmoid(x) from
    the same e and v (`discretize`)."""
    e = jnp.exp(-jnp.abs(x))
    v = 1.0 + e
    soft = jnp.maximum(x, 0.0) + jnp.log(v)
    return jnp.where(x > 20.0, x, soft), e, v


def discretize(delta_raw, bias, valid, delta_softplus, recip=None):
    """Returns dt' (masked to 0 past L) and, given `recip` (Lanes.recip; the backward's), its
    derivative d dt'/d delta, else None.

    d softplus(x)/dx = sigmoid(x) comes from the softplus's own e = e^-|x| and v = 1 + e:
    1 / v for x >= 0 and e / v below, so it costs one MUFU instruction (the reciprocal) on top
    of the softplus's exp2 and lg2, where 1 / (1 + e^-x) would take a second exp2. Above 20,
    1 / v rounds to 1 in fp32, the derivative of the identity that softplus is there."""
    x = delta_raw + bias
    if delta_softplus:
        dt, e, v = _softplus_parts(x)
    else:
        dt = x
    dt = jnp.where(valid, dt, 0.0)
    if recip is None:
        return dt, None
    if delta_softplus:
        r = recip(v)
        ddt = jnp.where(x >= 0.0, r, e * r)
    else:
        ddt = jnp.ones_like(x)
    return dt, jnp.where(valid, ddt, 0.0)


def compiler_params():
    return plgpu.CompilerParams(
        approx_math=True,
        # Every thread reads and writes only its own channel's SMEM column, and the TMA copies are
        # ordered by the pipeline's barriers and explicit commit_smem, so the lowering's
        # conservative barrier before every SMEM store is not needed.
        unsafe_no_auto_barriers=True,
        lowering_semantics=plgpu.LoweringSemantics.Lane,
    )


def interpret_params(interpret):
    if not interpret:
        return None
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams()


def chunk_combine(decay, local, h0):
    """Start states of every chunk from its affine map h_end = decay * h_start + local.

    decay, local: (b, c, e, n); h0: (b, e, n). Returns (b, c, e, n) start states."""
    a_cum, cum = jax.lax.associative_scan(
        lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]), (decay, local), axis=1
    )
    ends = a_cum * h0[:, None] + cum  # (b, c, e, n)
    return jnp.concatenate([h0[:, None], ends[:, :-1]], axis=1)


# TMA rows must be multiples of 16 bytes: a token's reset offset is repeated over 4 fp32 words.
RESET_ROW = 4


def segment_resets(segment_ids, plan: Plan):
    """segment_ids (b, l) int -> (b, l_pad, RESET_ROW) f32 exponent offsets for `decay`: -inf where
    a new segment starts (the id differs from the previous position's), 0 elsewhere, at position 0
    (the initial state feeds the first segment) and past l."""
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]  # (b, l - 1)
    starts = jnp.pad(starts, [(0, 0), (1, plan.length_pad - plan.length)])  # (b, l_pad)
    offsets = jnp.where(starts, -jnp.inf, 0.0).astype(jnp.float32)
    return jnp.broadcast_to(offsets[..., None], (*offsets.shape, RESET_ROW))


def reset_spec(plan: Plan, bi, tile_of):
    """BlockSpec of the (b, l_pad, RESET_ROW) reset offsets inside a kernel: the (T, RESET_ROW)
    tile tile_of(i) of batch row bi."""
    return pl.BlockSpec((None, plan.tile, RESET_ROW), lambda i: (bi, tile_of(i), 0))


def chunk_alive(reset, n_chunks):
    """(b, c) f32: 1 for a chunk with no segment start inside it, else 0. A chunk's affine map
    h_end = exp(A sum dt) alive h_start + h_local: a reset inside cuts the start state off."""
    b = reset.shape[0]
    return jnp.all(reset[..., 0].reshape(b, n_chunks, -1) == 0, axis=-1).astype(jnp.float32)


def cdiv(a, b):
    return -(-a // b)


def prod(xs):
    return math.prod(xs)
