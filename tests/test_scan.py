"""selective_scan: the reference against a literal float64 loop, and every other impl against it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mamba_jax.scan as scan_mod
from mamba_jax import selective_scan


def make_inputs(key, b, l, e, n, groups, dtype, with_extras=True):
    ks = jax.random.split(key, 9)
    bc_shape = (b, l, n) if groups is None else (b, l, groups, n)
    x = dict(
        u=jax.random.normal(ks[0], (b, l, e)).astype(dtype),
        delta=(0.5 * jax.random.normal(ks[1], (b, l, e))).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (e, n))),
        B=jax.random.normal(ks[3], bc_shape).astype(dtype),
        C=jax.random.normal(ks[4], bc_shape).astype(dtype),
    )
    if with_extras:
        x.update(
            D=jax.random.normal(ks[5], (e,)),
            z=jax.random.normal(ks[6], (b, l, e)).astype(dtype),
            delta_bias=0.5 * jax.random.normal(ks[7], (e,)),
            initial_state=jax.random.normal(ks[8], (b, e, n)),
        )
    return x


def numpy_scan(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, initial_state=None, softplus=True
):
    """DESIGN.md's recurrence written out literally, in float64."""
    f = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)
    u, delta, A, B, C, D, z, bias, h = map(f, (u, delta, A, B, C, D, z, delta_bias, initial_state))
    b, l, e = u.shape
    if B.ndim == 3:
        B, C = B[:, :, None], C[:, :, None]
    rep = e // B.shape[2]
    B, C = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)  # (b, l, e, n)
    dt = delta + (0 if bias is None else bias)
    if softplus:
        dt = np.where(dt > 20, dt, np.log1p(np.exp(dt)))
    h = np.zeros((b, e, A.shape[1])) if h is None else h
    ys = []
    for t in range(l):
        h = np.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t]
        y = np.sum(h * C[:, t], axis=-1) + (0 if D is None else D * u[:, t])
        if z is not None:
            y = y * z[:, t] / (1 + np.exp(-z[:, t]))
        ys.append(y)
    return np.stack(ys, 1), h


@pytest.mark.parametrize("groups", [None, 3])
@pytest.mark.parametrize("length", [1, 13])
def test_reference_matches_literal_recurrence(length, groups, assert_close):
    x = make_inputs(jax.random.key(length), 2, length, 6, 4, groups, jnp.float32)
    y, h = selective_scan(**x, delta_softplus=True, return_final_state=True, impl="reference")
    y_np, h_np = numpy_scan(**x)
    assert_close(y, y_np)
    assert_close(h, h_np)


def _run(impl, x, softplus):
    y, h = selective_scan(**x, delta_softplus=softplus, return_final_state=True, impl=impl)
    return y, h


def _loss_and_grads(impl, x, softplus, wy, wh):
    names = sorted(x)

    def loss(*vals):
        y, h = _run(impl, dict(zip(names, vals)), softplus)
        return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*(x[k] for k in names))
    return dict(zip(names, grads))


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Several chunks plus a padded tail at the test lengths.
    monkeypatch.setattr(scan_mod, "DEFAULT_CHUNK", 4)


@pytest.mark.parametrize("extras", [True, False], ids=["z_D_bias_h0", "plain"])
@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize("length", [1, 7, 18])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_associative_matches_reference(dtype, length, groups, extras, assert_close):
    e, n = 6, 5  # e is not a multiple of any block; n is not a power of two
    key = jax.random.key(hash((length, groups, extras)) % 2**31)
    x = make_inputs(key, 2, length, e, n, groups, dtype, with_extras=extras)
    y_ref, h_ref = _run("reference", x, extras)
    y, h = _run("associative", x, extras)
    assert y.dtype == x["u"].dtype and h.dtype == jnp.float32
    assert_close(y, y_ref, dtype, err_msg="y")
    assert_close(h, h_ref, dtype, err_msg="final state")

    kw, kh = jax.random.split(jax.random.fold_in(key, 1))
    wy = jax.random.normal(kw, y_ref.shape)
    wh = jax.random.normal(kh, h_ref.shape)
    g_ref = _loss_and_grads("reference", x, extras, wy, wh)
    g = _loss_and_grads("associative", x, extras, wy, wh)
    for name in g_ref:
        assert g[name].shape == x[name].shape and g[name].dtype == x[name].dtype
        assert_close(g[name], g_ref[name], dtype, grad=True, err_msg=f"grad {name}")


def test_final_state_carries_across_calls(assert_close):
    """Scanning [0, L) equals scanning [0, k) then [k, L) from the returned state."""
    x = make_inputs(jax.random.key(3), 2, 11, 4, 3, None, jnp.float32)
    full = selective_scan(**x, delta_softplus=True, return_final_state=True, impl="associative")
    first = {k: (v[:, :5] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    y1, h1 = selective_scan(**first, delta_softplus=True, return_final_state=True)
    second = {k: (v[:, 5:] if k in ("u", "delta", "B", "C", "z") else v) for k, v in x.items()}
    second["initial_state"] = h1
    y2, h2 = selective_scan(**second, delta_softplus=True, return_final_state=True)
    assert_close(jnp.concatenate([y1, y2], 1), full[0])
    assert_close(h2, full[1])


def test_softplus_threshold():
    """Above 20 the softplus is the identity, as in mamba_ssm."""
    x = make_inputs(jax.random.key(0), 1, 3, 2, 2, None, jnp.float32, with_extras=False)
    x["delta"] = jnp.full_like(x["delta"], 0.01)
    bias = jnp.array([30.0, -30.0])
    y = selective_scan(**x, delta_bias=bias, delta_softplus=True, impl="reference")
    y_np, _ = numpy_scan(**x, delta_bias=bias)
    np.testing.assert_allclose(np.asarray(y), y_np, rtol=1e-5, atol=1e-5)


BAD_INPUTS = {
    "u rank": (dict(u=jnp.zeros((2, 3))), "u must have shape"),
    "delta shape": (dict(delta=jnp.zeros((2, 4, 6))), "delta must have shape"),
    "A not (e, n)": (dict(A=jnp.zeros((5, 4))), "A must have shape"),
    "B shape": (dict(B=jnp.zeros((2, 3, 5))), "B must have shape"),
    "C shape": (dict(C=jnp.zeros((2, 3, 4, 1))), "C must have shape"),
    "groups": (dict(B=jnp.zeros((2, 3, 4, 4)), C=jnp.zeros((2, 3, 4, 4))), "must divide"),
    "int u": (dict(u=jnp.zeros((2, 3, 6), jnp.int32)), "u must have dtype"),
    "D shape": (dict(D=jnp.zeros((5,))), "D must have shape"),
    "z shape": (dict(z=jnp.zeros((2, 3, 5))), "z must have shape"),
    "initial_state": (dict(initial_state=jnp.zeros((2, 4, 6))), "initial_state must have shape"),
    "impl": (dict(impl="fast"), "impl must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises(case):
    x = make_inputs(jax.random.key(0), 2, 3, 6, 4, None, jnp.float32, with_extras=False)
    override, message = BAD_INPUTS[case]
    x.update(override)
    with pytest.raises(ValueError, match=message):
        selective_scan(**x)


def test_pallas_unsupported_on_cpu_is_a_clear_error():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU behaviour")
    x = make_inputs(jax.random.key(0), 1, 3, 4, 2, None, jnp.float32, with_extras=False)
    with pytest.raises(ValueError, match="impl='pallas' is not supported"):
        selective_scan(**x, impl="pallas")
    # auto falls back and still gives the reference result
    np.testing.assert_allclose(
        selective_scan(**x), selective_scan(**x, impl="reference"), rtol=1e-5, atol=1e-6
    )


def _naive_associative(u, dt, A, B, C):
    """Whole-sequence associative scan with plain autodiff: what the custom_vjp avoids."""
    a = jnp.exp(dt[..., None] * A)  # (b, l, e, n)
    bx = (dt * u)[..., None] * B[:, :, None, :]  # (b, l, e, n)
    _, h = jax.lax.associative_scan(scan_mod._combine, (a, bx), axis=1)
    return jnp.einsum("blen,bln->ble", h, C)


def fwd_bwd_temp_bytes(b=2, l=4096, e=256, n=16):
    """Peak temporary bytes of one fwd+bwd, from XLA's memory analysis (CPU, float32)."""
    spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
    args = (spec(b, l, e), spec(b, l, e), spec(e, n), spec(b, l, n), spec(b, l, n))

    def chunked(u, dt, A, B, C):
        y = selective_scan(u, dt, A, B, C, impl="associative")
        return jnp.sum(y)

    def naive(u, dt, A, B, C):
        return jnp.sum(_naive_associative(u, dt, A, B, C))

    out = {}
    for name, f in (("chunked", chunked), ("naive", naive)):
        compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4))).lower(*args).compile()
        out[name] = compiled.memory_analysis().temp_size_in_bytes
    return out


def test_associative_backward_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(scan_mod, "DEFAULT_CHUNK", 128)
    mem = fwd_bwd_temp_bytes()
    full = 2 * 4096 * 256 * 16 * 4  # one (b, l, e, n) float32 tensor
    print(
        f"fwd+bwd temp bytes: chunked {mem['chunked'] / 2**20:.1f} MiB, "
        f"naive {mem['naive'] / 2**20:.1f} MiB, one (b,l,e,n) tensor {full / 2**20:.0f} MiB"
    )
    assert mem["chunked"] < full, mem
    assert mem["chunked"] * 8 < mem["naive"], mem


def test_scan_step_matches_scan(assert_close):
    x = make_inputs(jax.random.key(5), 2, 4, 6, 3, 3, jnp.float32)
    y, h = selective_scan(**x, delta_softplus=True, return_final_state=True, impl="reference")
    state = x["initial_state"]
    ys = []
    for t in range(4):
        step = {k: x[k][:, t] for k in ("u", "delta", "B", "C", "z")}
        yt, state = scan_mod.selective_scan_step(
            **step,
            A=x["A"],
            D=x["D"],
            delta_bias=x["delta_bias"],
            state=state,
            delta_softplus=True,
        )
        ys.append(yt)
    assert_close(jnp.stack(ys, 1), y)
    assert_close(state, h)


# ----------------------------------------------------------------------------------------------
# Packed rows: segment_ids restart the state.


def _segments_alone(x, bounds, impl):
    """Runs each segment [s, t) of row 0 on its own (zero initial state except the first
    segment, which takes the row's initial state); returns y (1, l, e) and the last final state."""
    ys, h = [], None
    for k, (s, t) in enumerate(bounds):
        part = {
            name: (v[:1, s:t] if name in ("u", "delta", "z", "B", "C") else v)
            for name, v in x.items()
        }
        part["initial_state"] = x["initial_state"][:1] if k == 0 else None
        y, h = selective_scan(**part, delta_softplus=True, return_final_state=True, impl=impl)
        ys.append(y)
    return jnp.concatenate(ys, axis=1), h


@pytest.mark.parametrize("impl", ["reference", "associative"])
@pytest.mark.parametrize("groups", [None, 2])
def test_segment_ids_equal_running_each_segment_alone(impl, groups, assert_close):
    # Segments of length 1 at the first and last positions, and one across the associative
    # scan's chunk edge.
    bounds = [(0, 1), (1, 6), (6, 7), (7, 20), (20, 21)]
    length = bounds[-1][1]
    x = make_inputs(jax.random.key(7), 1, length, 4, 3, groups, jnp.float32)
    seg = jnp.concatenate([jnp.full((t - s,), k) for k, (s, t) in enumerate(bounds)])[None]
    seg = seg.astype(jnp.int32)

    def packed(x):
        return selective_scan(**x, delta_softplus=True, return_final_state=True,
                              segment_ids=seg, impl=impl)  # fmt: skip

    def alone(x):
        return _segments_alone(x, bounds, "reference")

    (y, h), (y_ref, h_ref) = packed(x), alone(x)
    assert_close(y, y_ref)
    assert_close(h, h_ref)

    def loss(fn):
        w = jax.random.normal(jax.random.key(3), y.shape)
        return lambda x: jnp.sum(fn(x)[0] * w) + jnp.sum(fn(x)[1] ** 2)

    grads, grads_ref = jax.grad(loss(packed))(x), jax.grad(loss(alone))(x)
    for name in grads:
        assert_close(grads[name], grads_ref[name], grad=True, err_msg=name)


def test_segment_ids_are_validated_and_positions_convert():
    x = make_inputs(jax.random.key(0), 2, 5, 4, 3, None, jnp.float32)
    with pytest.raises(ValueError, match=r"segment_ids must have shape \(b, l\)=\(2, 5\)"):
        selective_scan(**x, segment_ids=jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must be integers"):
        selective_scan(**x, segment_ids=jnp.zeros((2, 5), jnp.float32))
    positions = jnp.asarray([[0, 1, 2, 0, 1], [3, 4, 0, 0, 1]])
    np.testing.assert_array_equal(
        scan_mod.segment_ids_from_positions(positions), [[1, 1, 1, 2, 2], [0, 0, 1, 2, 2]]
    )
    keep = scan_mod.segment_keep(scan_mod.segment_ids_from_positions(positions), (2, 5))
    np.testing.assert_array_equal(keep, [[1, 1, 1, 0, 1], [1, 1, 0, 0, 1]])
