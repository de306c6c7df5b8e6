"""The Mosaic TPU selective-scan kernels (pallas_kernels/tpu_scan.py) on CPU.

No TPU is reachable, so two things are checked here:
  - interpret mode against the fp32 reference: forward, final state and the gradient of every
    input (through y and the final state), at awkward sizes; one case under the TPU interpreter
    (pltpu.InterpretParams), which simulates VMEM, raises on out-of-bounds reads, fills fresh
    buffers with NaN and looks for races;
  - lowering for TPU: every configuration's forward and backward lower to the Mosaic custom call.
What is not checked: that Mosaic compiles the lowered kernels, and their speed.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.experimental.pallas import tpu as pltpu

from mamba_jax.scan import selective_scan
from pallas_kernels.tpu_cost import SHAPES, TPU_CHIPS, tpu_scan_cost
from pallas_kernels.tpu_scan import (
    VMEM_BUDGET,
    TpuBlockSizes,
    bwd_vmem_bytes,
    make_tpu_plan,
    selective_scan_tpu,
    tpu_unsupported_reason,
)
from tests.conftest import SCAN_ARG_NAMES as ARG_NAMES
from tests.conftest import make_scan_args


def make_args(*args, **kwargs):
    """Scan arguments with delta_bias shifted down: softplus(0 + bias) of a padded token
    would visibly move the state."""
    return make_scan_args(*args, bias_shift=-0.5, **kwargs)


def make_segment_ids(seed, b, length):
    """Packed rows: a few segments per row, one starting exactly at a 128-token block edge."""
    starts = jax.random.bernoulli(jax.random.key(seed), 0.05, (b, length))
    starts = starts.at[:, min(128, length - 1)].set(True)
    return jnp.cumsum(starts.astype(jnp.int32), axis=1)


def _caller(names, fn):
    def call(*xs):
        kw = dict(zip(names, xs, strict=True))
        return fn(**{k: kw.get(k) for k in ARG_NAMES})

    return call


def tpu_fn(softplus, interpret, block_sizes=None, segment_ids=None):
    return functools.partial(
        selective_scan_tpu,
        delta_softplus=softplus,
        segment_ids=segment_ids,
        interpret=interpret,
        block_sizes=block_sizes,
    )


def reference_fn(softplus, segment_ids=None):
    return functools.partial(
        selective_scan,
        delta_softplus=softplus,
        segment_ids=segment_ids,
        return_final_state=True,
        impl="reference",
    )


def outputs_and_grads(fn, names, xs, cotangents):
    """One compiled program per implementation: (y, final state) and the VJP of every input."""

    def run(*xs):
        out, vjp = jax.vjp(_caller(names, fn), *xs)
        return out, vjp(cotangents)

    return jax.jit(run)(*xs)


def check_against_reference(
    args, softplus, interpret, assert_close, block_sizes=None, segment_ids=None
):
    dtype = args["u"].dtype
    names = [k for k in ARG_NAMES if args[k] is not None]
    xs = [args[k] for k in names]
    b, length, e = args["u"].shape
    ky, kh = jax.random.split(jax.random.key(100))
    cts = (
        jax.random.normal(ky, (b, length, e), dtype),
        jax.random.normal(kh, (b, e, args["A"].shape[1]), jnp.float32),
    )
    fast = tpu_fn(softplus, interpret, block_sizes, segment_ids)
    (y, h), grads = outputs_and_grads(fast, names, xs, cts)
    (y_ref, h_ref), grads_ref = outputs_and_grads(
        reference_fn(softplus, segment_ids), names, xs, cts
    )
    assert y.dtype == dtype and h.dtype == jnp.float32
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(h, h_ref, jnp.float32 if dtype == jnp.float32 else dtype, err_msg="final state")
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape, name
        assert_close(g, g_ref, dtype, grad=True, err_msg=f"d{name}")
    return names, xs, grads


# ----------------------------------------------------------------------------------------------
# Interpret mode: every feature, awkward sizes. Each case compiles one fwd+bwd program.

CASES = [
    # dtype, b, L, e, n, groups (0: shared (b, l, n)), z, D, bias, h0, softplus,
    # TpuBlockSizes (segments=True: packed rows with segment_ids)
    # L = 1, n = 1, e below one lane tile.
    (jnp.float32, 2, 1, 64, 1, 0, True, True, True, True, True, dict()),
    # Three sequence tiles (state carried across them), e over two lane tiles, two state chunks,
    # packed segments.
    (jnp.float32, 2, 300, 130, 16, 0, True, True, True, True, True,
     dict(seq_tile=128, state_chunk=8, segments=True)),
    # bf16, odd L, grouped B/C with a group (100 channels) padded to the lane tile, no options.
    (jnp.bfloat16, 2, 37, 200, 16, 2, False, False, False, False, False, dict()),
    # n = 64: four 16-state chunks; four groups of 64 channels.
    (jnp.float32, 1, 45, 256, 64, 4, True, True, True, True, True, dict()),
    # n = 256 (the limit), kept tiny in b and L.
    (jnp.bfloat16, 1, 9, 24, 256, 0, True, True, True, True, True, dict()),
    # The masked-reduction column picker, 256-lane tiles, n = 5 (padded to 8), three groups,
    # packed segments.
    (jnp.float32, 1, 140, 300, 5, 3, True, False, True, True, True,
     dict(seq_tile=128, lanes=256, pick="reduce", segments=True)),
    (jnp.float16, 1, 17, 128, 16, 1, True, True, True, False, True, dict()),
]  # fmt: skip


def _case_id(c):
    opts = "-".join(f"{k}{v}" for k, v in c[11].items())
    return f"{jnp.dtype(c[0]).name}-b{c[1]}-L{c[2]}-e{c[3]}-n{c[4]}-g{c[5]}-{opts}"


def _case_args(case):
    dtype, b, length, e, n, groups, z, D, bias, h0, softplus, opts = case
    args = make_args(
        0, b, length, e, n, groups, dtype, z=z, D=D, bias=bias, h0=h0, softplus=softplus
    )
    opts = dict(opts)
    seg = make_segment_ids(1, b, length) if opts.pop("segments", False) else None
    return args, softplus, TpuBlockSizes(**opts), seg


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_interpret_matches_reference(case, assert_close):
    args, softplus, bs, seg = _case_args(case)
    check_against_reference(args, softplus, True, assert_close, block_sizes=bs, segment_ids=seg)


def test_inference_forward_and_deterministic_gradients(assert_close):
    """The forward without saved states (the inference path), and gradients that are bitwise
    the same on a second run (partial sums are added by XLA in a fixed order)."""
    args, softplus, bs, seg = _case_args(CASES[1])
    y, h = jax.jit(tpu_fn(softplus, True, bs, seg))(**args)
    y_ref, h_ref = reference_fn(softplus, seg)(**args)
    assert_close(y, y_ref, err_msg="y")
    assert_close(h, h_ref, err_msg="final state")
    names = [k for k in ARG_NAMES if args[k] is not None]
    xs = [args[k] for k in names]

    def loss(*xs):
        y, h = _caller(names, tpu_fn(softplus, True, bs, seg))(*xs)
        return jnp.sum(y * y) + jnp.sum(h)

    grad = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs)))))
    first, second = grad(*xs), grad(*xs)
    for name, a, b in zip(names, first, second, strict=True):
        assert bool(jnp.array_equal(a, b)), f"d{name} differs between two runs"


def test_tpu_interpreter_bounds_and_races(assert_close):
    """The TPU interpreter: out-of-bounds reads raise, fresh buffers hold NaN (so reading scratch
    or outputs before writing them shows), and no races."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret

    params = pltpu.InterpretParams(detect_races=True)
    args = make_args(3, 1, 5, 24, 4, 0, jnp.float32)
    check_against_reference(args, True, params, assert_close)
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found


# ----------------------------------------------------------------------------------------------
# Lowering for TPU on this CPU machine: the Mosaic custom call for forward and backward.


def _lower_for_tpu(f, *xs):
    return jax.jit(f).trace(*xs).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_lowers_for_tpu(case):
    args, softplus, bs, seg = _case_args(case)
    names = [k for k in ARG_NAMES if args[k] is not None]
    xs = [args[k] for k in names]
    call = _caller(names, tpu_fn(softplus, False, bs, seg))
    fwd = _lower_for_tpu(call, *xs)
    assert fwd.count("tpu_custom_call") == 1 and "tpu_scan_fwd" in fwd

    def loss(*xs):
        y, h = call(*xs)
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    bwd = _lower_for_tpu(jax.grad(loss, argnums=tuple(range(len(xs)))), *xs)
    assert bwd.count("tpu_custom_call") == 2 and "tpu_scan_bwd" in bwd


@pytest.mark.parametrize("name, n", [("S1", 16), ("S2", 16), ("S3", 16), ("S4", 16), ("S1", 256)])
def test_benchmark_shapes_lower_for_tpu(name, n):
    """The benchmark shapes at full size (abstract arrays, nothing allocated), default tiling."""
    b, e, length = SHAPES[name]
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    act, bc = S((b, length, e), bf), S((b, length, n), bf)
    xs = (act, act, S((e, n), f32), bc, bc, S((e,), f32), act, S((e,), f32))

    def loss(*xs):
        y, h = selective_scan_tpu(*xs, delta_softplus=True)
        return jnp.sum(y.astype(f32)) + jnp.sum(h)

    text = _lower_for_tpu(jax.grad(loss, argnums=tuple(range(len(xs)))), *xs)
    assert text.count("tpu_custom_call") == 2


def test_stacked_calls_lower_the_kernels_once():
    """Calls in a row (a model's unrolled layers) share the jitted forward and backward: the
    lowered gradient holds as many Mosaic TPU kernels for 6 calls as for 3 (the last call's
    forward can be a second variant, its outputs pruned differently)."""
    S, bf, f32 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float32
    b, length, e, n = 2, 256, 256, 16
    act, bc = S((b, length, e), bf), S((b, length, n), bf)
    xs = (act, act, S((e, n), f32), bc, bc, S((e,), f32), act, S((e,), f32))

    def kernels(calls):
        def loss(u, *rest):
            total = 0.0
            for _ in range(calls):  # every call's outputs are used alike (no pruned variant)
                u, h = selective_scan_tpu(u, *rest, delta_softplus=True)
                total = total + jnp.sum(h)
            return total + jnp.sum(u.astype(f32))

        text = _lower_for_tpu(jax.grad(loss, argnums=tuple(range(len(xs)))), *xs)
        return text.count("tpu_custom_call")

    assert kernels(1) == 2
    assert kernels(6) == kernels(3) <= 3


# ----------------------------------------------------------------------------------------------
# Interface: plans, support queries, validation, the cost model (no kernel runs).


def test_plan_padding():
    plan = make_tpu_plan(2, 300, 200, 5, 2, TpuBlockSizes(seq_tile=128))
    assert (plan.p_pad, plan.e_pad, plan.n_lane_tiles, plan.tiles_per_group) == (128, 256, 2, 1)
    assert (plan.n_pad, plan.state_chunk, plan.n_seq_tiles, plan.length_pad) == (8, 8, 3, 384)
    short = make_tpu_plan(1, 7, 128, 256, 1)
    assert (short.seq_tile, short.n_pad, short.state_chunk, short.n_state_chunks) == (
        128,
        256,
        16,
        16,
    )


def test_plan_fits_vmem():
    """The sequence tile shrinks until the backward fits the VMEM budget (d_state 256 at S1)."""
    s1 = (8, 2048, 1536)
    assert make_tpu_plan(*s1, 16, 1).seq_tile == 512
    big = make_tpu_plan(*s1, 256, 1)
    assert big.seq_tile == 256
    assert bwd_vmem_bytes(big.seq_tile, big.lanes, big.n_pad, big.state_chunk) <= VMEM_BUDGET
    assert bwd_vmem_bytes(512, big.lanes, big.n_pad, big.state_chunk) > VMEM_BUDGET
    roomy = TpuBlockSizes(vmem_limit_bytes=64 * 2**20)
    assert make_tpu_plan(*s1, 256, 1, roomy).seq_tile == 512


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(seq_tile=100), "seq_tile"),
        (dict(lanes=64), "lanes"),
        (dict(state_chunk=12), "state_chunk"),
        (dict(pick="scatter"), "pick"),
    ],
)
def test_block_sizes_reject(kw, match):
    with pytest.raises(ValueError, match=match):
        TpuBlockSizes(**kw)


def test_unsupported_reason():
    kw = dict(batch=2, length=64, d=256, n=16, groups=1, dtype=jnp.bfloat16)
    assert tpu_unsupported_reason(**kw) is None
    assert "257" in tpu_unsupported_reason(**{**kw, "n": 257})
    assert "groups" in tpu_unsupported_reason(**{**kw, "groups": 3})
    assert "dtype" in tpu_unsupported_reason(**{**kw, "dtype": jnp.int32})


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
        (
            dict(
                A=jnp.zeros((8, 300)),
                B=jnp.zeros((1, 4, 300)),
                C=jnp.zeros((1, 4, 300)),
                initial_state=None,
            ),
            "256",
        ),
        (dict(segment_ids=jnp.zeros((1, 5), jnp.int32)), "segment_ids"),
        (dict(segment_ids=jnp.zeros((1, 4), jnp.float32)), "segment_ids"),
    ],
)
def test_validation_names_the_argument(bad, match):
    args = make_args(0, 1, 4, 8, 4, 0, jnp.float32)
    with pytest.raises(ValueError, match=match):
        selective_scan_tpu(**{**args, **bad})


def test_cost_model():
    b, e, length = SHAPES["S1"]
    cost = tpu_scan_cost(SHAPES["S1"])
    # Forward floor: read u, delta, z and write y (bf16), read B and C (bf16).
    assert cost["fwd"]["floor_bytes"] == 4 * b * length * e * 2 + 2 * b * length * 16 * 2
    for name in SHAPES:
        c = tpu_scan_cost(SHAPES[name])
        for part in ("fwd", "fwd_bwd"):
            assert c[part]["kernel_bytes"] >= c[part]["floor_bytes"] > 0
            assert set(c[part]["floors_ms"]) == set(TPU_CHIPS)
        assert c["fwd_bwd"]["vpu_ops"] > 3 * c["fwd"]["vpu_ops"]
    # More HBM bandwidth, a lower HBM floor.
    ms = cost["fwd"]["floors_ms"]
    assert ms["v5p"]["hbm"] < ms["v6e"]["hbm"] < ms["v5e"]["hbm"]


def test_routing_through_selective_scan_pallas(assert_close):
    """platform="tpu" (or a TPU backend) sends selective_scan_pallas to the TPU kernel."""
    import pallas_kernels as pk

    kw = dict(batch=2, length=64, d=256, n=16, groups=1, dtype=jnp.bfloat16)
    assert pk.unsupported_reason(**kw, backend="tpu") is None
    assert "TPU backend" in pk.unsupported_reason(**kw, platform="tpu", backend="cpu")
    assert pk.unsupported_reason(**kw, platform="tpu", interpret=True) is None
    assert "256" in pk.unsupported_reason(**{**kw, "n": 257}, backend="tpu")
    args = make_args(0, 1, 9, 24, 4, 0, jnp.float32)
    y, h = pk.selective_scan_pallas(**args, delta_softplus=True, platform="tpu", interpret=True)
    y_ref, h_ref = reference_fn(True)(**args)
    assert_close(y, y_ref, err_msg="y")
    assert_close(h, h_ref, err_msg="final state")
    with pytest.raises(ValueError, match="platform"):
        pk.selective_scan_pallas(**args, platform="npu", interpret=True)
    with pytest.raises(ValueError, match="TpuBlockSizes"):
        pk.selective_scan_pallas(
            **args, platform="tpu", interpret=True, block_sizes=pk.BlockSizes()
        )


def test_auto_picks_the_tpu_kernel_on_a_tpu_backend(monkeypatch):
    """The dispatcher's choice with the backend faked: pallas on TPU, associative on CPU."""
    from mamba_jax.scan import resolve_impl

    sizes = (2, 64, 256, 16, 1, jnp.bfloat16)
    assert resolve_impl("auto", *sizes) == "associative"  # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto", *sizes) == "pallas"
    assert resolve_impl("auto", 2, 64, 256, 257, 1, jnp.bfloat16) == "associative"  # n > 256
