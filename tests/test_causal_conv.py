"""The causal conv + SiLU kernel (pallas_kernels.causal_conv) against XLA's op
(mamba_jax.layers.causal_conv1d_silu): the output and the gradients of x, the state, the kernel
and the bias, on fresh random inputs. On CPU in Pallas interpret mode; on the GPU compiled."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import pallas_kernels.causal_conv as cc
from mamba_jax import MambaConfig, MambaLM
from mamba_jax.layers import CausalConv1d, causal_conv1d_silu, resolve_conv_impl
from tests.test_scan_sharding import on_mesh


def conv_inputs(seed, b, length, e, w, dtype, with_state=True):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (b, length, e)).astype(dtype)
    state = (jax.random.normal(ks[1], (b, w - 1, e)) if with_state else
             jnp.zeros((b, w - 1, e))).astype(dtype)  # fmt: skip
    kernel = 0.5 * jax.random.normal(ks[2], (w, e))
    bias = 0.5 * jax.random.normal(ks[3], (e,))
    gy = jax.random.normal(ks[4], (b, length, e))
    return (x, state, kernel, bias), gy


def check_against_xla(args, gy, dtype, assert_close, **kw):
    """Output and every gradient of the kernel against XLA's op on the same inputs."""

    def loss(f):
        return lambda *a: jnp.sum(f(*a).astype(jnp.float32) * gy)

    ours = functools.partial(cc.causal_conv1d_silu_pallas, out_dtype=dtype, **kw)
    xla = lambda x, s, k, b: causal_conv1d_silu(x, s, k, b, jnp.dtype(dtype))
    assert_close(jax.jit(ours)(*args), xla(*args), dtype, err_msg="out")
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3)))(*args)
    grads_ref = jax.grad(loss(xla), argnums=(0, 1, 2, 3))(*args)
    for name, a, r in zip(("x", "state", "kernel", "bias"), grads, grads_ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        assert_close(a, r, dtype, grad=True, err_msg=f"d{name}")


# b, l, e, w, dtype, blocks, with a state: L 1, odd L, chunks that do not divide L, channel
# blocks that do not divide e, width 3, bf16.
INTERPRET_CASES = [
    (2, 37, 200, 4, jnp.float32, cc.ConvBlockSizes(channels=64, chunk=16, unroll=4), True),
    (1, 1, 8, 4, jnp.float32, cc.ConvBlockSizes(channels=8, chunk=8, unroll=4), True),
    (2, 9, 24, 3, jnp.bfloat16, cc.ConvBlockSizes(channels=16, chunk=4, unroll=2), True),
    (1, 70, 40, 4, jnp.float32, cc.ConvBlockSizes(channels=32, chunk=64, unroll=8), False),
    (3, 3, 12, 2, jnp.float16, cc.ConvBlockSizes(channels=8, chunk=2, unroll=1), True),
]


@pytest.mark.parametrize("b, length, e, w, dtype, blocks, with_state", INTERPRET_CASES)
def test_interpret_matches_xla(b, length, e, w, dtype, blocks, with_state, assert_close):
    args, gy = conv_inputs(length * 31 + e, b, length, e, w, dtype, with_state)
    check_against_xla(args, gy, dtype, assert_close, blocks=blocks, interpret=True)


def test_bad_input():
    (x, state, kernel, bias), _ = conv_inputs(0, 2, 8, 16, 4, jnp.float32)
    f = functools.partial(cc.causal_conv1d_silu_pallas, interpret=True)
    with pytest.raises(ValueError, match="x must be"):
        f(x[0], state, kernel, bias)
    with pytest.raises(ValueError, match="kernel must be"):
        f(x, state, kernel[:, :8], bias)
    with pytest.raises(ValueError, match="state must be"):
        f(x, state[:, :2], kernel, bias)
    with pytest.raises(ValueError, match="bias must be"):
        f(x, state, kernel, bias[:3])
    with pytest.raises(ValueError, match="no empty dimension"):
        f(x[:, :0], state, kernel, bias)
    with pytest.raises(ValueError, match="out_dtype must be a floating-point"):
        f(x, state, kernel, bias, jnp.int8)
    with pytest.raises(ValueError, match="x must be floating"):
        f(x.astype(jnp.int32), state, kernel, bias)
    with pytest.raises(ValueError, match="widths 2..8"):
        f(x, state[:, :0], kernel[:1], bias)
    with pytest.raises(ValueError, match="channels must be a power of two"):
        cc.ConvBlockSizes(channels=48)
    with pytest.raises(ValueError, match="multiple of unroll"):
        cc.ConvBlockSizes(chunk=12, unroll=8)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU fallback")
def test_impl_choice_on_cpu():
    assert resolve_conv_impl("auto", 4, jnp.bfloat16) is False
    assert resolve_conv_impl("xla", 4, jnp.bfloat16) is False
    with pytest.raises(ValueError, match="conv impl='pallas' is not supported here"):
        resolve_conv_impl("pallas", 4, jnp.bfloat16)
    with pytest.raises(ValueError, match="MambaConfig.conv_impl must be one of"):
        MambaConfig(conv_impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        CausalConv1d(8, 4, impl="cuda", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "version, cap, expect",
    [("cuda 13.0", "9.0", None), ("cuda 13.0", "7.0", "compute capability >= 7.5"),
     ("rocm 6.4", "gfx942", "targets NVIDIA GPUs"), ("cuda 13.0", None, "cannot read")],
)  # fmt: skip
def test_which_gpus_the_kernel_takes(monkeypatch, version, cap, expect):
    """The Triton kernels' one GPU check (pallas_kernels._validation.nvidia_gpu_reason), on a
    faked device: NVIDIA from compute capability 7.5, not ROCm."""
    import types

    client = types.SimpleNamespace(platform_version=version)
    device = types.SimpleNamespace(device_kind="GPU X", client=client)
    if cap is not None:
        device.compute_capability = cap
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    reason = cc.conv_unsupported_reason(width=4, dtype=jnp.bfloat16, backend="gpu")
    assert reason is None if expect is None else expect in reason
    assert "needs a GPU backend" in cc.conv_unsupported_reason(width=4, dtype="bfloat16",
                                                               backend="cpu")  # fmt: skip
    assert "float32, bfloat16 or float16" in cc.conv_unsupported_reason(
        width=4, dtype=jnp.int32, backend="gpu"
    )


@pytest.fixture
def kernel_in_interpret_mode(monkeypatch):
    """The layers take the kernel path on CPU, running it in interpret mode; records calls."""
    calls = []
    real = cc.causal_conv1d_silu_pallas

    def interpreted(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw, interpret=True)

    monkeypatch.setattr(cc, "conv_unsupported_reason", lambda **kw: None)
    monkeypatch.setattr(cc, "causal_conv1d_silu_pallas", interpreted)
    return calls


def test_model_with_the_kernel_matches_xla(kernel_in_interpret_mode, assert_close):
    """A tiny MambaLM with conv_impl="pallas" (the kernel, interpreted) against conv_impl="xla":
    the same logits and parameter gradients; packed rows keep XLA's op."""
    config = MambaConfig(d_model=16, n_layer=1, vocab_size=64, scan_impl="reference")
    ids = jax.random.randint(jax.random.key(3), (2, 11), 0, 64)
    models = {impl: MambaLM(config.replace(conv_impl=impl), rngs=nnx.Rngs(0))
              for impl in ("pallas", "xla")}  # fmt: skip

    def loss(model):
        logits = model(ids)
        return jnp.mean(logits**2), logits

    out = {impl: nnx.value_and_grad(loss, has_aux=True)(m) for impl, m in models.items()}
    assert kernel_in_interpret_mode, "the kernel path was not taken"
    assert_close(out["pallas"][0][1], out["xla"][0][1], err_msg="logits")
    grads = [jax.tree.leaves(out[impl][1]) for impl in ("pallas", "xla")]
    for a, b in zip(*grads, strict=True):
        assert_close(a, b, grad=True)
    kernel_in_interpret_mode.clear()
    seg = jnp.array([[0] * 5 + [1] * 6, [0] * 11])
    models["pallas"](ids, segment_ids=seg)
    assert not kernel_in_interpret_mode, "packed rows must keep XLA's op"


def test_kernel_under_a_mesh(kernel_in_interpret_mode, assert_close):
    """With the kernel, the conv runs inside shard_map on a batch x tensor mesh (no sequence
    split: the path only a kernel takes) and equals the unsharded call, gradients included."""
    shape = (2, 1, 2, 1)
    conv = CausalConv1d(8, 4, impl="pallas", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 16, 8))
    graphdef, params = nnx.split(conv)

    def loss(params, x):
        out, new_state = nnx.merge(graphdef, params)(x, silu=True)
        return jnp.sum(jnp.sin(out)) + jnp.sum(new_state**2)

    value, wrapped = on_mesh(shape, loss, params, x)
    assert wrapped, "the kernel ran outside shard_map"
    assert_close(value, loss(params, x))
    grads, _ = on_mesh(shape, jax.grad(loss, argnums=(0, 1)), params, x)
    grads_ref = jax.grad(loss, argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert_close(a, b, grad=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "b, length, e, dtype, blocks",
    [
        (2, 2048, 4096, jnp.bfloat16, None),
        (3, 333, 200, jnp.bfloat16, None),
        (1, 1, 40, jnp.float32, None),
        (2, 1000, 1536, jnp.float32, cc.ConvBlockSizes(channels=256, chunk=128, warps=2)),
    ],
)
def test_gpu_matches_xla(b, length, e, dtype, blocks, assert_close):
    args, gy = conv_inputs(length + e, b, length, e, 4, dtype)
    check_against_xla(args, gy, dtype, assert_close, blocks=blocks)
