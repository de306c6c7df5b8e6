"""The scan and the conv under a (data, fsdp, tensor, sequence) mesh: shard_map equals the
unsharded computation (outputs, final states and every gradient), and bad meshes are errors."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from mamba_jax import selective_scan
from mamba_jax.layers import CausalConv1d
from mamba_jax.sharding import MESH_AXES

MESHES = [(2, 2, 2, 1), (1, 2, 1, 4), (1, 1, 2, 4), (2, 1, 1, 4)]


def mesh(shape):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def inputs(key, b, l, e, n, groups, dtype=jnp.float32, initial_state=True):
    ks = jax.random.split(key, 9)
    bc = (b, l, n) if groups is None else (b, l, groups, n)
    x = dict(
        u=jax.random.normal(ks[0], (b, l, e)).astype(dtype),
        delta=(0.5 * jax.random.normal(ks[1], (b, l, e))).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(ks[2], (e, n))),
        B=jax.random.normal(ks[3], bc).astype(dtype),
        C=jax.random.normal(ks[4], bc).astype(dtype),
        D=jax.random.normal(ks[5], (e,)),
        z=jax.random.normal(ks[6], (b, l, e)).astype(dtype),
        delta_bias=0.5 * jax.random.normal(ks[7], (e,)),
    )
    if initial_state:
        x["initial_state"] = jax.random.normal(ks[8], (b, e, n))
    return x


def scan_fn(impl, **kw):
    def f(x):
        return selective_scan(**x, **kw, delta_softplus=True, return_final_state=True, impl=impl)

    return f


def loss_of(fn, y_shape):
    w = jax.random.normal(jax.random.key(42), y_shape)
    return lambda x: jnp.sum(fn(x)[0].astype(jnp.float32) * w) + jnp.sum(fn(x)[1] ** 2)


def on_mesh(shape, fn, *args):
    """fn(*args) jitted and traced under the mesh; also says whether a shard_map was traced."""
    m = mesh(shape)
    with jax.set_mesh(m):
        wrapped = "shard_map" in str(jax.make_jaxpr(fn)(*args))
        return jax.jit(fn)(*args), wrapped


def check_against_unsharded(shape, fn, x, assert_close, dtype=jnp.float32):
    (y, h), wrapped = on_mesh(shape, fn, x)
    assert wrapped, f"{shape}: the scan did not run inside shard_map"
    y_ref, h_ref = jax.jit(fn)(x)
    assert_close(y, y_ref, dtype, err_msg=f"{shape} y")
    assert_close(h, h_ref, dtype, err_msg=f"{shape} final state")
    loss = loss_of(fn, y_ref.shape)
    grads, _ = on_mesh(shape, jax.grad(loss), x)
    grads_ref = jax.jit(jax.grad(loss))(x)
    for name in x:
        assert_close(grads[name], grads_ref[name], dtype, grad=True, err_msg=f"{shape} d{name}")


# Each mesh with one case: impl, B/C groups, initial state, dtype. Lengths of 16 give 4-token
# shards on the sequence axis.
CASES = {
    (2, 2, 2, 1): ("associative", None, True, jnp.float32),
    (1, 2, 1, 4): ("reference", 2, False, jnp.float32),
    (1, 1, 2, 4): ("associative", 4, True, jnp.bfloat16),
    (2, 1, 1, 4): ("associative", None, False, jnp.float32),
}


@pytest.mark.parametrize("shape", list(CASES), ids=str)
def test_sharded_scan_equals_unsharded(shape, assert_close):
    impl, groups, h0, dtype = CASES[shape]
    x = inputs(jax.random.key(sum(shape)), 4, 16, 8, 3, groups, dtype, initial_state=h0)
    check_against_unsharded(shape, scan_fn(impl), x, assert_close, dtype)


def test_groups_per_tensor_shard(assert_close, caplog):
    # 2 groups of 4 channels on 4 tensor shards of 2 channels: each shard reads one group.
    x = inputs(jax.random.key(1), 2, 8, 8, 3, 2)
    check_against_unsharded((1, 1, 4, 2), scan_fn("associative"), x, assert_close)
    # 6 groups of 2 channels on 4 shards of 3: a group straddles two shards, so the channels
    # stay whole (replicated over tensor), still correct, and the log says so once.
    x = inputs(jax.random.key(2), 2, 8, 12, 3, 6)
    with caplog.at_level(logging.WARNING, logger="mamba_jax.scan_sharding"):
        check_against_unsharded((1, 1, 4, 2), scan_fn("associative"), x, assert_close)
    said = [r.message for r in caplog.records if "do not fall evenly" in r.message]
    assert len(said) == 1, said


def test_segments_across_sequence_shards(assert_close):
    # 16 positions on 4 shards of 4: a segment starting exactly at a shard start (8), one inside
    # a shard (5), and one running across three shards (8..15 continues from 8).
    seg = jnp.asarray([[0] * 5 + [1] * 3 + [2] * 8, [0] * 16], jnp.int32)
    x = inputs(jax.random.key(3), 2, 16, 8, 3, None)
    check_against_unsharded((1, 1, 2, 4), scan_fn("associative", segment_ids=seg), x, assert_close)


def test_without_a_mesh_nothing_changes():
    x = inputs(jax.random.key(4), 2, 8, 4, 3, None)
    fn = scan_fn("associative")
    assert "shard_map" not in str(jax.make_jaxpr(fn)(x))
    one = jax.make_mesh(
        (1, 1, 1, 1), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=jax.devices()[:1]
    )
    with jax.set_mesh(one):
        assert "shard_map" not in str(jax.make_jaxpr(fn)(x))


@pytest.mark.parametrize(
    "shape, sizes, match",
    [
        ((2, 2, 2, 1), dict(b=6), r"batch b=6 must be a multiple of the data x fsdp mesh size 4"),
        ((1, 1, 2, 4), dict(l=10), r"length l=10 must be a multiple of the sequence mesh size 4"),
        ((1, 2, 4, 1), dict(e=6), r"d_inner e=6 must be a multiple of the tensor mesh size 4"),
    ],
)
def test_mesh_that_does_not_divide_is_an_error(shape, sizes, match):
    sizes = dict(dict(b=4, l=8, e=8), **sizes)
    x = inputs(jax.random.key(5), sizes["b"], sizes["l"], sizes["e"], 3, None)
    with jax.set_mesh(mesh(shape)), pytest.raises(ValueError, match=match):
        jax.jit(scan_fn("associative"))(x)


def test_kernel_runs_per_block_and_falls_back(monkeypatch, assert_close, caplog):
    """impl="pallas" goes through the same shard_map, and the kernel sees one device's block.

    The Mosaic GPU kernel cannot run here (its interpreter's callbacks are not supported inside
    a jitted shard_map on CPU), so a stand-in with the kernel's signature records the shapes it
    is given and computes with the reference."""
    import pallas_kernels

    seen = []

    def stand_in(*args, **kw):
        seen.append((args[0].shape, args[3].shape))  # u, B
        return selective_scan(*args, **kw, return_final_state=True, impl="reference")

    # The kernel takes a block only when its channels are a multiple of 4 (a made-up rule).
    def reason(*, d, **_):
        return None if d % 4 == 0 else f"d={d} is not a multiple of 4"

    monkeypatch.setattr(pallas_kernels, "selective_scan_pallas", stand_in)
    monkeypatch.setattr(pallas_kernels, "unsupported_reason", reason)
    x = inputs(jax.random.key(6), 4, 16, 8, 3, None)
    on_mesh((1, 2, 2, 2), scan_fn("pallas"), x)
    assert seen and all(s == ((2, 8, 4), (2, 8, 3)) for s in seen), seen
    check_against_unsharded((1, 2, 2, 2), scan_fn("pallas"), x, assert_close)
    # On 4 tensor shards a block holds 2 channels: the associative scan runs instead, once said.
    seen.clear()
    with caplog.at_level(logging.WARNING, logger="mamba_jax.scan_sharding"):
        on_mesh((1, 1, 4, 2), scan_fn("pallas"), x)
    assert not seen
    assert any("d=2 is not a multiple of 4" in r.message for r in caplog.records)


@pytest.mark.parametrize(
    "shape, silu, with_state", [((1, 1, 2, 4), False, True), ((2, 1, 1, 4), True, False)]
)
def test_conv_halo_equals_unsharded(shape, silu, with_state, assert_close):
    conv = CausalConv1d(8, 4, rngs=nnx.Rngs(0))
    ks = jax.random.split(jax.random.key(7), 2)
    x = jax.random.normal(ks[0], (2, 16, 8))
    state = jax.random.normal(ks[1], (2, 3, 8)) if with_state else None
    graphdef, params = nnx.split(conv)

    def fn(params, x, state):
        return nnx.merge(graphdef, params)(x, state, silu=silu)

    def loss(params, x, state):
        out, new_state = fn(params, x, state)
        return jnp.sum(jnp.sin(out)) + jnp.sum(new_state**2)

    (out, new_state), wrapped = on_mesh(shape, fn, params, x, state)
    assert wrapped
    out_ref, state_ref = fn(params, x, state)
    assert_close(out, out_ref, err_msg="conv out")
    assert_close(new_state, state_ref, err_msg="conv state")
    grads, _ = on_mesh(shape, jax.grad(loss, argnums=(0, 1, 2)), params, x, state)
    grads_ref = jax.grad(loss, argnums=(0, 1, 2))(params, x, state)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert_close(a, b, grad=True, err_msg="conv grads")


def test_prefill_on_a_sequence_mesh_and_loading(tmp_path, assert_close):
    """A prefill (initial states in, final states out) traced under a (1, 2, 2, 2) mesh equals
    the unsharded one; a checkpoint loads onto that mesh and generates the same tokens."""
    from mamba_jax import MambaConfig, MambaLM, generate, load_pretrained, save_pretrained

    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64), rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(8), (2, 16), 0, 64)
    cache = model.init_cache(2)
    cache = cache._replace(ssm=jax.random.normal(jax.random.key(9), cache.ssm.shape))
    graphdef, state = nnx.split(model)
    prefill = lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache)
    (logits, new_cache), wrapped = on_mesh((1, 2, 2, 2), prefill, state, ids, cache)
    assert wrapped
    logits_ref, cache_ref = prefill(state, ids, cache)
    assert_close(logits, logits_ref)
    for a, b in zip(new_cache, cache_ref, strict=True):
        assert_close(a, b)

    save_pretrained(model, tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m", mesh=mesh((1, 2, 2, 2)))
    kernel = nnx.state(loaded)["layers"]["mixer"]["in_proj"]["kernel"][...]
    assert len(kernel.sharding.device_set) == 8
    np.testing.assert_array_equal(generate(loaded, ids[:, :5], 4), generate(model, ids[:, :5], 4))
