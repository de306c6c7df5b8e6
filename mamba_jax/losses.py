"""The language-model loss without whole logits: a chunked linear cross-entropy.

    total, correct = linear_cross_entropy(hidden, table, targets, mask, vocab_size=v)

equals, for logits = hidden @ table.T with the padded rows (v and up) masked out,

    total   = sum(mask * softmax_cross_entropy(logits, targets))
    correct = sum(mask * (argmax(logits) == targets))

but the logits exist one sequence chunk at a time, (b, chunk, v_pad) float32, never (b, l, v_pad):
at 130m, batch 16 x 2048, the whole logits are 6.6 GB in float32 and as much again for their
gradient. The matmuls take the compute dtype (bf16 in training) with float32 accumulation.

Its VJP is computed in the forward pass, chunk by chunk: the cotangent of a scalar loss is a
scalar, so each chunk's softmax - onehot can be multiplied into d(hidden) and d(table) while its
logits are at hand, and the backward only scales the two by the incoming cotangent. Without
differentiation (evaluation) the forward computes the loss alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Tokens per chunk (all rows of the batch together): the float32 logits of one chunk are
# CHUNK_TOKENS * v_pad * 4 bytes, 0.8 GB at the GPT-NeoX vocabulary.
CHUNK_TOKENS = 4096


def linear_cross_entropy(hidden, table, targets, mask=None, *, vocab_size=None,
                         chunk_tokens: int = CHUNK_TOKENS):  # fmt: skip
    """Summed masked cross-entropy of the tied head, and the correct argmax predictions.

    Args:
      hidden: (b, l, d) final normalised hidden states, in the compute dtype.
      table: (v_pad, d) the output embedding (tied to the input); cast to hidden's dtype for the
        matmuls, its gradient comes back in table's dtype.
      targets: (b, l) int.
      mask: (b, l) float, 1 where a position counts; None counts every position.
      vocab_size: the real vocabulary; rows vocab_size..v_pad - 1 get no probability mass.
      chunk_tokens: about how many tokens (b x chunk length) share one chunk's logits.

    Returns:
      (total, correct), float32 scalars. Differentiable in hidden and table.
    """
    if not hasattr(hidden, "ndim") or hidden.ndim != 3:
        raise ValueError(f"hidden must have shape (b, l, d), got {getattr(hidden, 'shape', None)}")
    b, length, d = hidden.shape
    if not hasattr(table, "ndim") or table.ndim != 2 or table.shape[1] != d:
        raise ValueError(f"table must have shape (v, d={d}), got {getattr(table, 'shape', None)}")
    if tuple(targets.shape) != (b, length) or not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(
            f"targets must be an integer array of shape (b, l)={(b, length)}, got "
            f"{targets.dtype} {tuple(targets.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (b, length):
        raise ValueError(f"mask must have shape (b, l)={(b, length)}, got {tuple(mask.shape)}")
    v_pad = table.shape[0]
    vocab_size = v_pad if vocab_size is None else int(vocab_size)
    if not 0 < vocab_size <= v_pad:
        raise ValueError(f"vocab_size must be in [1, {v_pad}] (the table's rows), got {vocab_size}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    mask = jnp.ones((b, length), jnp.float32) if mask is None else mask.astype(jnp.float32)
    chunk = max(1, min(length, chunk_tokens // max(b, 1)))
    pad = -length % chunk
    if pad:  # padded positions have mask 0: they add nothing to the loss or the gradients
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    total, correct = _lce(hidden, table, targets.astype(jnp.int32), mask, vocab_size, chunk)
    return total, correct


def _chunk_logits(h, w, vocab_size):
    """h: (b, c, d); w: (v_pad, d) -> (b, c, v_pad) float32, padded rows at -inf."""
    logits = jnp.einsum("bcd,vd->bcv", h, w, preferred_element_type=jnp.float32)
    if vocab_size < w.shape[0]:
        logits = jnp.where(jnp.arange(w.shape[0]) < vocab_size, logits, -jnp.inf)
    return logits


def _run(hidden, table, targets, mask, vocab_size, chunk, with_grads):
    """The loop over sequence chunks. Returns (total, correct) and, with_grads, (dhidden,
    dtable): the gradients of total."""
    b, length, d = hidden.shape
    w = table.astype(hidden.dtype)  # (v_pad, d)
    v_pad = w.shape[0]
    f32 = jnp.float32

    def body(i, carry):
        total, correct, dh, dw = carry
        start = i * chunk
        h = jax.lax.dynamic_slice_in_dim(hidden, start, chunk, axis=1)  # (b, c, d)
        t = jax.lax.dynamic_slice_in_dim(targets, start, chunk, axis=1)  # (b, c)
        m = jax.lax.dynamic_slice_in_dim(mask, start, chunk, axis=1)  # (b, c)
        logits = _chunk_logits(h, w, vocab_size)  # (b, c, v_pad)
        top = jnp.max(logits, axis=-1, keepdims=True)  # (b, c, 1)
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True))
        target_logit = jnp.take_along_axis(logits, t[..., None], axis=-1)  # (b, c, 1)
        total = total + jnp.sum((lse - target_logit)[..., 0] * m)
        hit = jnp.argmax(logits, axis=-1) == t  # (b, c)
        correct = correct + jnp.sum(hit.astype(f32) * m)
        if with_grads:
            onehot = jnp.arange(v_pad) == t[..., None]  # (b, c, v_pad)
            g = ((jnp.exp(logits - lse) - onehot) * m[..., None]).astype(hidden.dtype)
            dh_c = jnp.einsum("bcv,vd->bcd", g, w, preferred_element_type=f32)
            dh = jax.lax.dynamic_update_slice_in_dim(dh, dh_c.astype(dh.dtype), start, axis=1)
            dw = dw + jnp.einsum("bcv,bcd->vd", g, h, preferred_element_type=f32)
        return total, correct, dh, dw

    zero = jnp.zeros((), f32)
    if with_grads:
        init = (zero, zero, jnp.zeros_like(hidden), jnp.zeros((v_pad, d), f32))
    else:
        init = (zero, zero, None, None)
    total, correct, dh, dw = jax.lax.fori_loop(0, length // chunk, body, init)
    if not with_grads:
        return total, correct
    return (total, correct), (dh, dw.astype(table.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lce(hidden, table, targets, mask, vocab_size, chunk):
    return _run(hidden, table, targets, mask, vocab_size, chunk, with_grads=False)


def _lce_fwd(hidden, table, targets, mask, vocab_size, chunk):
    out, grads = _run(hidden, table, targets, mask, vocab_size, chunk, with_grads=True)
    return out, grads


def _lce_bwd(vocab_size, chunk, grads, cotangents):
    dh, dw = grads
    g_total = cotangents[0]  # `correct` counts argmax hits: it has no gradient
    return (
        (dh * g_total).astype(dh.dtype),
        (dw * g_total).astype(dw.dtype),
        None,
        None,
    )


_lce.defvjp(_lce_fwd, _lce_bwd)
