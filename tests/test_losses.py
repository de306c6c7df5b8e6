"""The chunked linear cross-entropy against optax on whole logits: value, accuracy, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mamba_jax.losses import linear_cross_entropy


def _reference(hidden, table, targets, mask, vocab_size):
    logits = jnp.einsum("bld,vd->blv", hidden, table)
    logits = jnp.where(jnp.arange(table.shape[0]) < vocab_size, logits, -jnp.inf)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(losses * mask), jnp.sum(hits * mask)


# One token per chunk, ragged chunks (13 positions in chunks of 2), one chunk.
@pytest.mark.parametrize("chunk_tokens, with_mask", [(1, True), (7, True), (4096, False)])
def test_matches_optax_on_whole_logits(chunk_tokens, with_mask):
    b, length, d, v_pad, vocab = 3, 13, 8, 24, 19  # five padded rows, l not a multiple of chunks
    keys = jax.random.split(jax.random.key(chunk_tokens), 5)
    hidden = jax.random.normal(keys[0], (b, length, d))
    table = jax.random.normal(keys[1], (v_pad, d))
    targets = jax.random.randint(keys[2], (b, length), 0, vocab)
    # Some targets are the argmax, so the accuracy count is not trivially zero.
    best = jnp.argmax(jnp.einsum("bld,vd->blv", hidden, table)[..., :vocab], axis=-1)
    targets = jnp.where(jax.random.uniform(keys[3], (b, length)) < 0.5, best, targets)
    mask = (jax.random.uniform(keys[4], (b, length)) > 0.3).astype(jnp.float32)
    if not with_mask:
        mask = jnp.ones((b, length))

    def ours(h, w):
        m = mask if with_mask else None
        return linear_cross_entropy(h, w, targets, m, vocab_size=vocab, chunk_tokens=chunk_tokens)

    total, correct = ours(hidden, table)
    want_total, want_correct = _reference(hidden, table, targets, mask, vocab)
    np.testing.assert_allclose(total, want_total, rtol=1e-5)
    assert float(correct) == float(want_correct) > 0
    grads = jax.grad(lambda h, w: ours(h, w)[0], argnums=(0, 1))(hidden, table)
    want = jax.grad(lambda h, w: _reference(h, w, targets, mask, vocab)[0], (0, 1))(hidden, table)
    for got, ref in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(grads[1][vocab:]))  # padded rows get no gradient


def test_cotangent_scales_the_gradients_and_dtypes_follow_the_inputs():
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (2, 5, 4), jnp.bfloat16)
    table = jax.random.normal(keys[1], (16, 4), jnp.float32)
    targets = jax.random.randint(keys[2], (2, 5), 0, 16)
    f = lambda h, w, s: s * linear_cross_entropy(h, w, targets)[0]
    g1 = jax.grad(f, argnums=(0, 1))(hidden, table, 1.0)
    g3 = jax.grad(f, argnums=(0, 1))(hidden, table, 3.0)
    assert g1[0].dtype == jnp.bfloat16 and g1[1].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g3[1]), 3 * np.asarray(g1[1]), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(hidden=jnp.zeros((2, 4))), "hidden must have shape"),
        (dict(table=jnp.zeros((16, 5))), "table must have shape"),
        (dict(targets=jnp.zeros((2, 5))), "targets must be an integer array"),
        (dict(mask=jnp.ones((2, 4))), "mask must have shape"),
        (dict(vocab_size=17), "vocab_size must be in"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = dict(hidden=jnp.zeros((2, 5, 4)), table=jnp.zeros((16, 4)),
                targets=jnp.zeros((2, 5), jnp.int32), mask=None, vocab_size=None)  # fmt: skip
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(args["hidden"], args["table"], args["targets"], args["mask"],
                             vocab_size=args["vocab_size"])  # fmt: skip
