"""The Pallas selective-scan kernels against the fp32 reference: forward, final state, gradients.

On CPU the Mosaic GPU kernels run in interpret mode (tiny shapes, every feature once); the tests
marked gpu run the compiled kernels on a Hopper GPU at larger, awkward shapes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

import pallas_kernels as pk
from mamba_jax.scan import selective_scan
from pallas_kernels._common import make_plan

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_args(seed, b, length, e, n, groups, dtype, *, z=True, D=True, bias=True, h0=True,
              softplus=True):  # fmt: skip
    ks = jax.random.split(jax.random.key(seed), 9)
    delta = jax.random.normal(ks[1], (b, length, e)) * 0.7 - 1.0
    # Without softplus, delta must already be a positive step, or the state grows without bound.
    delta = delta if softplus else jax.nn.softplus(delta)
    bc_shape = (b, length, n) if groups == 0 else (b, length, groups, n)
    return dict(
        u=jax.random.normal(ks[0], (b, length, e), dtype),
        delta=delta.astype(dtype),
        A=-jnp.exp(jax.random.normal(ks[2], (e, n)) * 0.5),
        B=jax.random.normal(ks[3], bc_shape, dtype),
        C=jax.random.normal(ks[4], bc_shape, dtype),
        D=jax.random.normal(ks[5], (e,)) if D else None,
        z=jax.random.normal(ks[6], (b, length, e), dtype) if z else None,
        delta_bias=jax.random.normal(ks[7], (e,)) * 0.3 if bias else None,
        initial_state=jax.random.normal(ks[8], (b, e, n)) if h0 else None,
    )


def pallas_fn(softplus, interpret, block_sizes=None):
    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return pk.selective_scan_pallas(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=softplus,
            initial_state=initial_state, interpret=interpret, block_sizes=block_sizes,
        )  # fmt: skip

    return f


def reference_fn(softplus):
    def f(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus=softplus,
            initial_state=initial_state, return_final_state=True, impl="reference",
        )  # fmt: skip

    return f


def check_against_reference(args, softplus, interpret, assert_close, block_sizes=None, seed=0):
    dtype = args["u"].dtype
    names = [k for k in ARG_NAMES if args[k] is not None]
    fast, ref = pallas_fn(softplus, interpret, block_sizes), reference_fn(softplus)

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
     dict(chunks=1, unroll=False)),
    (jnp.float16, 1, 9, 128, 20, 1, True, True, True, True, True, dict(chunks=2)),
    # The default policy at a small size: the forward in one pass, the backward split in 3.
    (jnp.float32, 1, 21, 128, 16, 0, True, True, True, True, True,
     dict(split_below=1, stages=3)),
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
        assert (plan.n_chunks, plan.bwd_chunks) == (1, 3)
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


@pytest.mark.parametrize(
    "b, e, length, fwd_chunks",
    [(8, 1536, 2048, 1), (4, 4096, 2048, 1), (2, 2048, 16384, 32), (1, 1536, 131072, 64)],
)
def test_default_split_policy(b, e, length, fwd_chunks):
    """The issue's S1-S4: the forward splits only when the blocks cannot fill the GPU; the
    backward always splits towards target_blocks."""
    plan = make_plan(b, length, e, 16, 1, pk.BlockSizes())
    assert plan.n_chunks == fwd_chunks
    assert plan.bwd_chunks > 1 and plan.backward().n_chunks == plan.bwd_chunks
    assert plan.backward().tiles_per_chunk * plan.bwd_chunks == plan.n_tiles


@pytest.mark.parametrize("length", [1, 30])
def test_interpret_forward_lengths_without_races(length, assert_close):
    from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks

    args = make_args(1, 1, length, 128, 8, 0, jnp.float32)
    params = plgpu.InterpretGPUParams(detect_races=True)
    f, ref = pallas_fn(True, params, pk.BlockSizes(tile=8, chunks=3)), reference_fn(True)
    (y, h), (y_ref, h_ref) = jax.block_until_ready(f(**args)), ref(**args)
    assert not gpu_callbacks.get_races().races_found
    assert_close(y, y_ref, err_msg="y")
    assert_close(h, h_ref, err_msg="final state")


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
    ],
)
def test_validation_names_argument(bad, match):
    args = {**make_args(0, 1, 4, 8, 4, 0, jnp.float32), **bad}
    with pytest.raises(ValueError, match=match):
        pk.selective_scan_pallas(**args, interpret=True)


# ----------------------------------------------------------------------------------------------
# Compiled on a Hopper GPU (run through the device tool): larger, awkward shapes.

SHUFFLE_SUM = pk.BlockSizes(bwd_reduce="shuffle")
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
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{jnp.dtype(c[0]).name}-L{c[2]}-e{c[3]}-n{c[4]}-g{c[5]}")  # fmt: skip
def test_gpu_matches_reference(case, assert_close):
    dtype, b, length, e, n, groups, z, D, bias, h0, softplus, bs = case
    args = make_args(
        3, b, length, e, n, groups, dtype, z=z, D=D, bias=bias, h0=h0, softplus=softplus
    )
    check_against_reference(args, softplus, False, assert_close, block_sizes=bs)


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
