"""The Pallas selective-scan kernels against the fp32 reference: forward, final state, gradients.

On CPU the Mosaic GPU kernels run in interpret mode (tiny shapes, every feature once); the tests
marked gpu run the compiled kernels on a Hopper GPU at larger, awkward shapes.
"""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels as pk
from mamba_jax.scan import selective_scan
from pallas_kernels._common import make_plan
from tests.conftest import SCAN_ARG_NAMES as ARG_NAMES
from tests.conftest import make_scan_args as make_args
from tests.conftest import segment_ids_from_starts


def pallas_fn(softplus, interpret, block_sizes=None, segment_ids=None):
    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return pk.selective_scan_pallas(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=softplus,
            initial_state=initial_state, segment_ids=segment_ids, interpret=interpret,
            block_sizes=block_sizes,
        )  # fmt: skip

    return f


def reference_fn(softplus, segment_ids=None):
    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=softplus,
            initial_state=initial_state, return_final_state=True, segment_ids=segment_ids,
            impl="reference",
        )  # fmt: skip

    return f


def check_against_reference(
    args, softplus, interpret, assert_close, block_sizes=None, seed=0, segment_ids=None
):
    """Forward, final state and the gradient of every array argument against the fp32 reference
    (segment_ids: (b, l) int, passed to both)."""
    dtype = args["u"].dtype
    names = [k for k in ARG_NAMES if args[k] is not None]
    fast = pallas_fn(softplus, interpret, block_sizes, segment_ids)
    ref = reference_fn(softplus, segment_ids)

    def call(fn, *xs):
        kw = dict(zip(names, xs, strict=True))
        return fn(**{k: kw.get(k) for k in ARG_NAMES})

    xs = [args[k] for k in names]
    y, h = jax.jit(functools.partial(call, fast))(*xs)
    y_ref, h_ref = jax.jit(functools.partial(call, ref))(*xs)
    assert y.dtype == args["u"].dtype and h.dtype == jnp.float32
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(h, h_ref, jnp.float32 if dtype == jnp.float32 else dtype, err_msg="final state")

    ky, kh = jax.random.split(jax.random.key(seed + 100))
    gy = jax.random.normal(ky, y_ref.shape, jnp.float32)
    gh = jax.random.normal(kh, h_ref.shape, jnp.float32)

    def loss(fn, *xs):
        y, h = call(fn, *xs)
        return jnp.sum(y.astype(jnp.float32) * gy) + jnp.sum(h * gh)

    argnums = tuple(range(len(xs)))
    grads = jax.jit(jax.grad(functools.partial(loss, fast), argnums))(*xs)
    grads_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums))(*xs)
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, grad=True, err_msg=f"d{name}")
    return grads


# ----------------------------------------------------------------------------------------------
# Interpret mode on CPU: every feature, tiny shapes. Each case is one fwd + one bwd interpretation.

INTERPRET_CASES = [
    # dtype, b, L, e, n, groups (0: shared (b, l, n)), z, D, bias, h0, softplus, BlockSizes
    (jnp.float32, 1, 21, 128, 16, 0, True, True, True, True, True,
     dict(chunks=2, bwd_reduce="shuffle")),
    (jnp.bfloat16, 2, 11, 192, 5, 2, False, False, False, False, False,
     dict(chunks=1, unroll=False, fwd_lanes=1)),
    (jnp.float16, 1, 9, 128, 20, 1, True, True, True, True, True, dict(chunks=2)),
    # The default policy at a small size: the forward in one pass (two lanes per channel), the
    # backward split in 3.
    (jnp.float32, 1, 21, 128, 16, 0, True, True, True, True, True,
     dict(split_below=1, stages=3)),
    # Two threads per channel in the backward's main pass (64-channel blocks; 192 = 3 blocks).
    (jnp.float32, 1, 21, 192, 16, 0, True, True, True, True, True, dict(chunks=2, bwd_lanes=2)),
    (jnp.bfloat16, 2, 11, 128, 5, 2, True, False, True, False, True,
     dict(chunks=1, bwd_lanes=2, sub=8, fwd_lanes=2)),
    (jnp.float16, 1, 19, 192, 16, 0, True, True, True, True, True, dict(chunks=2, fwd_lanes=2)),
]  # fmt: skip


def _case_id(c):
    opts = "-".join(f"{k}{v}" for k, v in c[11].items())
    return f"{jnp.dtype(c[0]).name}-L{c[2]}-e{c[3]}-n{c[4]}-g{c[5]}-{opts}"


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=_case_id)
def test_interpret_matches_reference(case, assert_close):
    dtype, b, length, e, n, groups, z, D, bias, h0, softplus, opts = case
    args = make_args(
        0, b, length, e, n, groups, dtype, z=z, D=D, bias=bias, h0=h0, softplus=softplus
    )
    bs = pk.BlockSizes(tile=8, **opts)
    plan = make_plan(b, length, e, n, 1, bs)
    assert plan.bwd_reduce == opts.get("bwd_reduce", "smem")
    if "split_below" in opts:
        assert (plan.n_chunks, plan.bwd_chunks, plan.fwd_lanes) == (1, 3, 2)
    check_against_reference(args, softplus, True, assert_close, block_sizes=bs)


def test_block_sizes_bwd_reduce():
    plan = lambda n, **kw: make_plan(1, 64, 128, n, 1, pk.BlockSizes(**kw))
    assert plan(16).bwd_reduce == "smem"
    assert plan(16, bwd_reduce="shuffle").bwd_reduce == "shuffle"
    # A tile's 2 n sums per token must fill whole 128-thread rows for the shuffle path.
    assert plan(8, tile=8, sub=4, bwd_reduce="shuffle").bwd_reduce == "shuffle"
    assert plan(8, tile=4, sub=4, bwd_reduce="shuffle").bwd_reduce == "smem"
    with pytest.raises(ValueError, match="bwd_reduce"):
        pk.BlockSizes(bwd_reduce="atomic")
    with pytest.raises(ValueError, match="stages"):
        pk.BlockSizes(stages=1)
    # Two lanes per channel: SMEM sums only, a whole tile's states in registers by default, and
    # the backward's split counted in 64-channel blocks.
    two = plan(16, bwd_lanes=2, bwd_reduce="shuffle", chunks=None)
    assert (two.bwd_reduce, two.sub, two.bwd_lanes) == ("smem", 8, 2)
    assert plan(16, bwd_slots=8).bwd_chunks == 8
    assert plan(16, bwd_slots=8, bwd_lanes=2).bwd_chunks == 4
    with pytest.raises(ValueError, match="bwd_slots"):
        pk.BlockSizes(bwd_slots=0)
    with pytest.raises(ValueError, match="bwd_lanes"):
        pk.BlockSizes(bwd_lanes=4)
    with pytest.raises(ValueError, match="fwd_lanes"):
        pk.BlockSizes(fwd_lanes=0)
    # fwd_lanes None: two lanes exactly when the forward runs in one pass.
    assert plan(16, chunks=1).fwd_lanes == 2
    assert plan(16, chunks=2).fwd_lanes == 1
    assert plan(16, chunks=1, fwd_lanes=1).fwd_lanes == 1
    # The forward counts its own blocks too: 64 channels wide, 2 x 64 >= split_below = 2.
    assert plan(16, split_below=2).n_chunks > 1
    assert plan(16, split_below=2, fwd_lanes=2).n_chunks == 1


@pytest.mark.parametrize(
    "b, e, length, fwd_chunks, fwd_lanes, bwd_chunks",
    [(8, 1536, 2048, 1, 2, 8), (4, 4096, 2048, 1, 2, 4), (2, 2048, 16384, 32, 1, 16),
     (1, 1536, 131072, 64, 1, 64)],
)  # fmt: skip
def test_default_split_policy(b, e, length, fwd_chunks, fwd_lanes, bwd_chunks):
    """The issue's S1-S4: the forward splits only when the blocks cannot fill the GPU, and runs
    two lanes per channel when it does not split; the backward splits into the chunks whose
    blocks fill the 2 x 132 slots in the least waves x (L / c + 32): S1's 96 blocks x 8 = 768
    (3 waves of L / 8; 4 chunks take 2 of L / 4), S2's 128 x 4 = 512 (2 waves of L / 4; 8
    chunks take 4 of L / 8, plus the fixed costs), S3's 32 x 16 and S4's 12 x 64 = 768."""
    plan = make_plan(b, length, e, 16, 1, pk.BlockSizes())
    assert (plan.n_chunks, plan.fwd_lanes, plan.bwd_chunks) == (fwd_chunks, fwd_lanes, bwd_chunks)
    assert plan.backward().n_chunks == plan.bwd_chunks
    assert plan.backward().tiles_per_chunk * plan.bwd_chunks == plan.n_tiles


# L = 30 in 4 chunks of one 8-token tile: segment starts on a chunk boundary (8), a one-token
# segment (8), and a start at the last position, so the reset tiles are race-checked too.
@pytest.mark.parametrize("length, starts", [(1, None), (30, [8, 9, 29])])
def test_interpret_forward_lengths_without_races(length, starts, assert_close):
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    args = make_args(1, 1, length, 128, 8, 0, jnp.float32)
    seg = None if starts is None else segment_ids_from_starts(length, starts)
    params = plgpu.InterpretGPUParams(detect_races=True)
    bs = pk.BlockSizes(tile=8, chunks=3)
    f, ref = pallas_fn(True, params, bs, segment_ids=seg), reference_fn(True, segment_ids=seg)
    (y, h), (y_ref, h_ref) = jax.block_until_ready(f(**args)), ref(**args)
    assert not gpu_callbacks.get_races().races_found
    assert_close(y, y_ref, err_msg="y")
    assert_close(h, h_ref, err_msg="final state")


# ----------------------------------------------------------------------------------------------
# Packed sequences: segment ids restart the state inside the kernels, forward and backward.


# L = 21 in 8-token tiles: tiles (and, split in 3, chunks) start at 8 and 16; the last token is 20.
SEGMENT_CASES = [
    # dtype, L, e, n, groups, BlockSizes options, each row's segment starts, (fwd, bwd) chunks.
    # Split forward and backward; n = 20 runs as two 16-state scans. Row 0: one-token segments at
    # the first and last positions and at 8-9 (a tile and chunk start), starts inside tiles;
    # row 1: a start on a chunk boundary and a one-token segment right after it.
    (jnp.float32, 21, 128, 20, 0, dict(chunks=3), [[1, 5, 8, 9, 10, 20], [16, 17]], (3, 3)),
    # One-pass forward (split_below=1), backward split in 3, grouped B/C, the token loop not
    # unrolled. Row 0: one-token segments 1-3 and starts on the backward's chunk boundaries;
    # row 1: a start at a tile's last token and at the last position.
    (jnp.bfloat16, 21, 128, 5, 2, dict(split_below=1, unroll=False), [[1, 2, 3, 8, 16], [7, 20]],
     (1, 3)),
]  # fmt: skip


@pytest.mark.parametrize(
    "case", SEGMENT_CASES, ids=lambda c: f"{jnp.dtype(c[0]).name}-n{c[3]}-g{c[4]}-fwd{c[7][0]}"
)
def test_interpret_segments_match_reference(case, assert_close):
    dtype, length, e, n, groups, opts, starts, chunks = case
    args = make_args(5, 2, length, e, n, groups, dtype)
    seg = segment_ids_from_starts(length, *starts)
    bs = pk.BlockSizes(tile=8, **opts)
    plan = make_plan(2, length, e, n, max(groups, 1), bs)
    assert (plan.n_chunks, plan.bwd_chunks) == chunks
    # The segments change the answer (the reference with and without them differ), so a kernel
    # that ignored them would fail below.
    ref = jax.jit(lambda a, f: f(**a)[0], static_argnums=1)
    y_seg, y_plain = ref(args, reference_fn(True, seg)), ref(args, reference_fn(True))
    assert not np.allclose(np.asarray(y_seg, np.float32), np.asarray(y_plain, np.float32))
    check_against_reference(args, True, True, assert_close, block_sizes=bs, segment_ids=seg)


def test_segment_ids_reach_the_kernel(monkeypatch):
    """selective_scan(impl="pallas") hands segment ids to the kernel (no fallback to another
    scan). The kernel is replaced by a recorder: on CPU only interpret mode could run it."""
    import pallas_kernels

    calls = []

    def recorder(*args, **kwargs):
        calls.append(kwargs)
        return reference_fn(kwargs["delta_softplus"], kwargs["segment_ids"])(
            *args, initial_state=kwargs["initial_state"]
        )

    monkeypatch.setattr(pallas_kernels, "unsupported_reason", lambda **kw: None)
    monkeypatch.setattr(pallas_kernels, "selective_scan_pallas", recorder)
    args = make_args(0, 1, 6, 8, 4, 0, jnp.float32)
    seg = segment_ids_from_starts(6, [2])
    selective_scan(**args, delta_softplus=True, segment_ids=seg, impl="pallas")
    assert len(calls) == 1 and calls[0]["segment_ids"] is seg


# ----------------------------------------------------------------------------------------------
# Interface: support queries and argument validation (no kernel runs).


def test_supported_queries():
    kw = dict(batch=2, length=64, d=256, n=16, groups=1, dtype=jnp.bfloat16)
    assert pk.supported(**kw, interpret=True)
    assert pk.unsupported_reason(**kw, backend="cpu") is not None
    assert pk.unsupported_reason(**{**kw, "n": 257}, interpret=True) is not None
    assert pk.unsupported_reason(**{**kw, "groups": 3}, interpret=True) is not None
    assert pk.unsupported_reason(**{**kw, "dtype": jnp.int32}, interpret=True) is not None


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU refusal")
def test_dispatcher_refuses_pallas_without_gpu():
    args = make_args(0, 1, 4, 8, 4, 0, jnp.float32)
    with pytest.raises(ValueError, match="pallas"):
        selective_scan(**args, impl="pallas")


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(delta=jnp.zeros((1, 5, 8))), "delta"),
        (dict(A=jnp.zeros((9, 4))), "A"),
        (dict(B=jnp.zeros((1, 4, 5))), "B"),
        (dict(C=jnp.zeros((1, 4, 3, 4))), "C"),
        (dict(D=jnp.zeros((7,))), "D"),
        (dict(z=jnp.zeros((1, 4, 8), jnp.int32)), "z"),
        (dict(initial_state=jnp.zeros((1, 8, 5))), "initial_state"),
        (dict(delta_bias=jnp.zeros((8,), jnp.int32)), "delta_bias"),
        (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), r"segment_ids must have shape \(b, l\)"),
        (dict(segment_ids=jnp.zeros((1, 4), jnp.float32)), "segment_ids must have an integer"),
        (dict(segment_ids=[[0, 0, 1, 1]]), "segment_ids must be an array"),
    ],
)
def test_validation_names_argument(bad, match):
    args = {**make_args(0, 1, 4, 8, 4, 0, jnp.float32), **bad}
    with pytest.raises(ValueError, match=match):
        pk.selective_scan_pallas(**args, interpret=True)


# ----------------------------------------------------------------------------------------------
# Compiled on a Hopper GPU (run through the device tool): larger, awkward shapes.

SHUFFLE_SUM = pk.BlockSizes(bwd_reduce="shuffle")
TWO_LANES = pk.BlockSizes(bwd_lanes=2, sub=8, fwd_lanes=2)
GPU_CASES = [
    # dtype, b, L, e, n, groups, z, D, bias, h0, softplus, block sizes
    (jnp.bfloat16, 2, 1000, 384, 16, 0, True, True, True, False, True, None),
    (jnp.float32, 1, 777, 200, 16, 0, True, True, True, True, True, pk.BlockSizes(chunks=5)),
    (jnp.float16, 3, 129, 256, 8, 2, False, True, False, True, False, None),
    (jnp.bfloat16, 1, 300, 256, 3, 1, True, False, True, True, True, pk.BlockSizes(tile=16)),
    (jnp.float32, 2, 257, 128, 64, 0, True, True, True, True, True, None),
    (jnp.bfloat16, 1, 64, 160, 1, 0, True, True, True, True, True, None),
    (jnp.float32, 1, 70, 128, 256, 0, False, True, True, True, True, None),
    (jnp.bfloat16, 2, 1000, 384, 16, 0, True, True, True, True, True, SHUFFLE_SUM),
    (jnp.bfloat16, 2, 1000, 320, 16, 0, True, True, True, True, True, TWO_LANES),
    (jnp.float32, 1, 333, 200, 8, 2, True, True, True, True, True, TWO_LANES),
    (jnp.float32, 1, 150, 128, 64, 0, True, True, True, True, True, TWO_LANES),
    # The default policy's one-pass forward (two lanes per channel) at an odd width and length.
    (jnp.bfloat16, 2, 333, 200, 16, 0, True, True, True, True, True, pk.BlockSizes(split_below=1)),
]


def _block_sizes_id(bs):
    """The fields of BlockSizes `bs` (None: the defaults) that differ from the defaults."""
    bs, default = bs or pk.BlockSizes(), pk.BlockSizes()
    return "-".join(f"{k}{v}" for k, v in vars(bs).items() if v != getattr(default, k)) or "default"


def _gpu_case_id(c):
    return f"{jnp.dtype(c[0]).name}-L{c[2]}-e{c[3]}-n{c[4]}-g{c[5]}-{_block_sizes_id(c[11])}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=_gpu_case_id)
def test_gpu_matches_reference(case, assert_close):
    dtype, b, length, e, n, groups, z, D, bias, h0, softplus, bs = case
    args = make_args(
        3, b, length, e, n, groups, dtype, z=z, D=D, bias=bias, h0=h0, softplus=softplus
    )
    check_against_reference(args, softplus, False, assert_close, block_sizes=bs)


def random_segment_ids(seed, b, length, plan):
    """(b, l) int32: random starts (1 in 40), plus in row 0 one-token segments at positions 0-3
    and at the last position and a start on every forward and backward chunk boundary; with b > 1
    the last row is one segment."""
    rng = np.random.default_rng(seed)
    starts = rng.random((b, length)) < 1 / 40
    starts[0, [1, 2, 3, length - 1]] = True
    for tiles in (plan.tiles_per_chunk, plan.backward().tiles_per_chunk):
        starts[0, tiles * plan.tile :: tiles * plan.tile] = True
    starts[:, 0] = False
    if b > 1:
        starts[-1] = False
    return jnp.asarray(np.cumsum(starts, axis=1, dtype=np.int32))


GPU_SEGMENT_CASES = [
    # dtype, b, L, e, n, groups, block sizes
    (jnp.bfloat16, 2, 1000, 384, 16, 0, None),
    (jnp.float32, 1, 777, 200, 16, 0, pk.BlockSizes(chunks=5)),
    (jnp.bfloat16, 2, 1000, 384, 16, 2, pk.BlockSizes(split_below=1)),  # one-pass forward
    (jnp.float16, 3, 129, 256, 8, 2, None),
    (jnp.float32, 2, 257, 128, 64, 0, None),
    (jnp.bfloat16, 2, 1000, 384, 16, 0, SHUFFLE_SUM),
]


def _gpu_segment_case_id(c):
    return f"{jnp.dtype(c[0]).name}-b{c[1]}-L{c[2]}-e{c[3]}-n{c[4]}-g{c[5]}-{_block_sizes_id(c[6])}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_SEGMENT_CASES, ids=_gpu_segment_case_id)
def test_gpu_segments_match_reference(case, assert_close):
    dtype, b, length, e, n, groups, bs = case
    args = make_args(6, b, length, e, n, groups, dtype)
    plan = make_plan(b, length, e, n, max(groups, 1), bs or pk.BlockSizes())
    seg = random_segment_ids(7, b, length, plan)
    check_against_reference(args, True, False, assert_close, block_sizes=bs, segment_ids=seg)


@pytest.mark.gpu
def test_gpu_dispatcher_runs_segments_in_the_kernel():
    args = make_args(8, 2, 600, 256, 16, 0, jnp.bfloat16)
    seg = random_segment_ids(9, 2, 600, make_plan(2, 600, 256, 16, 1, pk.BlockSizes()))
    kw = dict(delta_softplus=True, return_final_state=True, segment_ids=seg)
    auto = jax.jit(lambda a: selective_scan(**a, **kw))(args)
    kernel = jax.jit(lambda a: pallas_fn(True, False, segment_ids=seg)(**a))(args)
    for x, k in zip(auto, kernel, strict=True):  # the same kernel: bitwise equal
        np.testing.assert_array_equal(np.asarray(x), np.asarray(k))


@pytest.mark.gpu
def test_gpu_gradients_are_deterministic():
    args = make_args(4, 2, 2048, 512, 16, 0, jnp.bfloat16)
    f = pallas_fn(True, False)

    @jax.jit
    def grads(*xs):
        return jax.grad(lambda *a: jnp.sum(f(*a)[0].astype(jnp.float32) ** 2), range(9))(*xs)

    xs = [args[k] for k in ARG_NAMES]
    first, second = grads(*xs), grads(*xs)
    for name, a, b in zip(ARG_NAMES, first, second, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.gpu
def test_gpu_auto_picks_pallas():
    from mamba_jax import scan

    assert scan.resolve_impl("auto", 1, 64, 256, 16, 1, jnp.bfloat16) == "pallas"


def test_remat_policy_keeps_the_named_checkpoints_and_runs_one_forward_kernel(monkeypatch):
    """The forward tags its state checkpoints SCAN_CHECKPOINTS: under a remat policy that keeps
    them (and y) the lowered backward has no second forward kernel; under one that keeps nothing
    the forward kernel runs again. Lowered for CUDA on this CPU machine. (The TPU kernel tags its
    checkpoints too; its StableHLO keeps the dead recomputed call for XLA to remove, see NOTES.)"""
    from jax.ad_checkpoint import checkpoint_name

    monkeypatch.setattr(pk, "unsupported_reason", lambda **kw: None)  # lowering needs no device
    xs = list(make_args(3, 2, 24, 40, 16, 0, jnp.float32).values())

    def loss(*xs):
        y, h = pk.selective_scan_pallas(*xs[:8], delta_softplus=True, initial_state=xs[8])
        return jnp.sum(checkpoint_name(y, "y") ** 2) + jnp.sum(h)

    def forward_kernels(policy):
        grad = jax.value_and_grad(jax.checkpoint(loss, policy=policy), argnums=tuple(range(9)))
        text = jax.jit(grad).trace(*xs).lower(lowering_platforms=("cuda",)).as_text()
        kernels = re.findall(r"selective_scan_\w*fwd\w*_mosaic_gpu", text)
        assert "selective_scan_bwd" in text, "no backward kernel found"
        return collections.Counter(kernels)  # a split forward is two kernels

    keep = jax.checkpoint_policies.save_only_these_names("y", pk.SCAN_CHECKPOINTS)
    once = forward_kernels(keep)
    assert once and set(once.values()) == {1}, once
    assert forward_kernels(jax.checkpoint_policies.nothing_saveable) == once + once


@pytest.mark.parametrize("gate_dtype", [jnp.bfloat16, jnp.float16, jnp.float32, None])
def test_lanes_sigmoids_match_jax(gate_dtype):
    """The kernels' sigmoid and gate sigmoid, as interpret mode runs them (a division for 1 / v,
    tanh exact on CPU): the formulas match jax.nn.sigmoid over the whole range, overflow of
    e^-x included; the half-precision gate takes the tanh form, fp32 or no gate the other."""
    from pallas_kernels._common import Lanes

    x = jnp.concatenate([jnp.linspace(-100.0, 100.0, 4001), jnp.asarray([-1e30, 1e30, 0.0])])
    want = jax.nn.sigmoid(x)
    lay = Lanes(1, 16, interpret=True, gate_dtype=gate_dtype)
    assert lay.approx_gate == (gate_dtype in (jnp.bfloat16, jnp.float16))
    np.testing.assert_allclose(lay.sigmoid(x), want, rtol=1e-6, atol=0)
    # 0.5 + 0.5 tanh(x / 2) rounds to the fp32 spacing at 0.5 (6e-8), so it has an absolute
    # error there (on the GPU tanh.approx adds up to 2.5e-4, see Lanes.gate_sigmoid).
    atol = 1.2e-7 if lay.approx_gate else 0
    np.testing.assert_allclose(lay.gate_sigmoid(x), want, rtol=2e-6, atol=atol)


def test_discretize_derivative_matches_autodiff():
    """discretize's d dt'/d delta, the sigmoid taken from the softplus's own e^-|x| (a division
    for the reciprocal, as interpret mode runs it), against autodiff of mamba_ssm's softplus
    (x above 20) to fp32 rounding in relative terms, over the whole range: both sides of 0 and
    20, overflow included. Positions past L (valid False) give dt' = 0 and a zero derivative;
    without softplus the derivative is 1."""
    from pallas_kernels import _common as cm

    x = jnp.concatenate([jnp.linspace(-100.0, 100.0, 4001), jnp.asarray([-1e30, 1e30, 0.0])])
    x = jnp.concatenate([x, jnp.asarray([20.0, np.nextafter(20.0, 21.0, dtype=np.float32)])])
    ref = lambda v: jnp.where(v > 20.0, v, jax.nn.softplus(v))
    bias = jnp.float32(0.25)
    valid = jnp.arange(x.size) % 7 != 3
    recip = cm.Lanes(1, 16, interpret=True).recip
    delta = x - bias
    x = delta + bias  # the sum discretize forms, rounded as it rounds it
    dt, ddt = cm.discretize(delta, bias, valid, True, recip)
    want_dt = jnp.where(valid, ref(x), 0.0)
    want_ddt = jnp.where(valid, jax.vmap(jax.grad(ref))(x), 0.0)
    # log(1 + e) rounds 1 + e first: dt' is off by up to the fp32 spacing at 1 (absolute).
    np.testing.assert_allclose(dt, want_dt, rtol=1e-6, atol=1.2e-7)
    np.testing.assert_allclose(ddt, want_ddt, rtol=1e-6, atol=1e-30)
    assert cm.discretize(delta, bias, valid, True)[1] is None  # the forward's: no derivative
    dt, ddt = cm.discretize(delta, bias, valid, False, recip)
    np.testing.assert_allclose(dt, jnp.where(valid, x, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(ddt, valid.astype(jnp.float32))


def test_sigmoid_recip_lowers_to_one_rcp_instruction(monkeypatch):
    """On the GPU, Lanes.recip is PTX rcp.approx.ftz.f32 (one MUFU instruction), not an IEEE
    division; the half-precision gate is tanh.approx. Checked in the CUDA lowering's text."""
    monkeypatch.setattr(pk, "unsupported_reason", lambda **kw: None)  # lowering needs no device
    xs = list(make_args(2, 1, 40, 128, 16, 0, jnp.bfloat16, z=True).values())

    def loss(*xs):
        y, _ = pk.selective_scan_pallas(*xs[:8], delta_softplus=True)
        return jnp.sum(y.astype(jnp.float32) ** 2)

    text = (
        jax.jit(jax.grad(loss, argnums=(0, 1, 6)))
        .trace(*xs)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )
    assert "rcp.approx.ftz.f32" in text, "no approximate reciprocal in the kernels"
    assert "tanh.approx.f32" in text, "no tanh in the half-precision gate"


@pytest.mark.parametrize(
    "n, groups, segments", [(16, 0, False), (8, 2, True), (5, 1, False)], ids=str
)
def test_two_lane_backward_lowers_for_cuda(monkeypatch, n, groups, segments):
    """BlockSizes(fwd_lanes=2, bwd_lanes=2) put a channel's states on two threads through a custom
    Mosaic GPU layout that interpret mode does not model: the whole fwd + bwd (split forward
    included) must lower for CUDA (on this CPU machine), every state width and option included."""
    monkeypatch.setattr(pk, "unsupported_reason", lambda **kw: None)  # lowering needs no device
    xs = list(make_args(4, 2, 40, 256, n, groups, jnp.bfloat16, z=True).values())
    seg = jnp.asarray(np.repeat([[0, 1]], 20, axis=1).repeat(2, axis=0)) if segments else None
    bs = pk.BlockSizes(bwd_lanes=2, sub=8, chunks=2, fwd_lanes=2)

    def loss(*xs):
        y, h = pk.selective_scan_pallas(*xs[:8], delta_softplus=True, initial_state=xs[8],
                                        block_sizes=bs, segment_ids=seg)  # fmt: skip
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h)

    grad = jax.value_and_grad(loss, argnums=tuple(range(9)))
    text = jax.jit(grad).trace(*xs).lower(lowering_platforms=("cuda",)).as_text()
    assert "selective_scan_bwd_mosaic_gpu" in text
