"""Decoding: prefill + steps equal the full forward, and generate() equals a greedy argmax loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM, generate
from mamba_jax.sampling import sample_logits

CFG = MambaConfig(d_model=16, n_layer=2, vocab_size=29, scan_impl="associative")


@pytest.fixture(scope="module")
def model():
    return MambaLM(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("prefill", [1, 2, 7])
def test_prefill_then_steps_equals_full_forward(model, prefill):
    k = 4
    x = jax.random.randint(jax.random.key(prefill), (3, prefill + k), 0, 29)
    full = model(x)
    logits, cache = model(x[:, :prefill], cache=model.init_cache(3))
    outs = [logits]
    for t in range(prefill, prefill + k):
        step_logits, cache = model.step(x[:, t], cache)
        outs.append(step_logits[:, None])
    np.testing.assert_allclose(np.concatenate(outs, 1), np.asarray(full), rtol=1e-5, atol=1e-5)
    assert cache.conv.shape == (2, 3, 3, 32) and cache.ssm.shape == (2, 3, 32, 16)


def test_two_prefills_equal_one(model):
    x = jax.random.randint(jax.random.key(9), (2, 9), 0, 29)
    full = model(x)
    l1, cache = model(x[:, :4], cache=model.init_cache(2))
    l2, cache = model(x[:, 4:], cache=cache)
    np.testing.assert_allclose(np.concatenate([l1, l2], 1), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_last_only_equals_the_last_position(model):
    x = jax.random.randint(jax.random.key(11), (2, 6), 0, 29)
    full = model(x)
    last = model(x, last_only=True)
    cached_full, cache_a = model(x, cache=model.init_cache(2))
    cached_last, cache_b = model(x, cache=model.init_cache(2), last_only=True)
    assert last.shape == (2, 1, CFG.padded_vocab_size)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(full[:, -1:]))
    np.testing.assert_array_equal(np.asarray(cached_last), np.asarray(cached_full[:, -1:]))
    np.testing.assert_array_equal(np.asarray(cache_a.ssm), np.asarray(cache_b.ssm))


def test_greedy_generate_matches_argmax_loop(model):
    prompt = jax.random.randint(jax.random.key(1), (2, 5), 0, 29)
    out = generate(model, prompt, 6)
    assert out.shape == (2, 11) and out.dtype == jnp.int32
    seq = prompt
    for _ in range(6):
        nxt = jnp.argmax(model(seq)[:, -1, : CFG.vocab_size], axis=-1)
        seq = jnp.concatenate([seq, nxt[:, None].astype(seq.dtype)], axis=1)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(seq))


def test_sampling_is_seeded_and_stays_in_vocab(model):
    prompt = jax.random.randint(jax.random.key(2), (4, 3), 0, 29)
    a = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    b = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(7))
    c = generate(model, prompt, 8, temperature=1.0, rng=jax.random.key(8))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert int(a.max()) < CFG.vocab_size
    # top_k=1 is greedy whatever the temperature.
    g = generate(model, prompt, 8)
    k1 = generate(model, prompt, 8, temperature=2.0, top_k=1, rng=jax.random.key(3))
    np.testing.assert_array_equal(np.asarray(g), np.asarray(k1))


def test_top_k_and_top_p_restrict_the_support():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top_k = sample_logits(logits, keys, temperature=1.0, top_k=2)
    assert set(np.unique(np.asarray(top_k))) == {0, 1}
    top_p = sample_logits(logits, keys, temperature=1.0, top_p=0.7)
    assert set(np.unique(np.asarray(top_p))) == {0, 1}  # 0.5 < 0.7 needs the second token
    top_p = sample_logits(logits, keys, temperature=1.0, top_p=0.4)
    assert set(np.unique(np.asarray(top_p))) == {0}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_ids=jnp.zeros((3,), jnp.int32)), "input_ids must have shape"),
        (dict(input_ids=jnp.zeros((1, 2), jnp.float32)), "input_ids must be integers"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
    ],
)
def test_generate_rejects_bad_arguments(model, kwargs, match):
    args = dict(input_ids=jnp.zeros((1, 2), jnp.int32), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)
