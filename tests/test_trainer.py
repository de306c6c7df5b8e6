"""The one training loss: masked positions and padded vocabulary rows."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mamba_jax import MambaConfig, MambaLM
from mamba_jax.training import trainer


def test_loss_scores_only_masked_positions_and_never_the_padded_vocab():
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=11, scan_impl="reference")
    assert cfg.padded_vocab_size == 16  # five padded rows that must get no probability mass
    model = MambaLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    inputs = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    targets = jax.random.randint(jax.random.key(2), (3, 7), 0, 11)
    mask = jnp.zeros((3, 7)).at[:, -2:].set(1.0)
    batch = {"inputs": inputs, "targets": targets, "mask": mask}
    total, count, correct = trainer.loss_terms(graphdef, trainer.pure(state), batch)
    logits = model(inputs)[:, -2:, :11]
    want = optax.softmax_cross_entropy_with_integer_labels(logits, targets[:, -2:])
    assert float(count) == 6
    np.testing.assert_allclose(total, want.sum(), rtol=1e-5)
    np.testing.assert_allclose(correct, jnp.sum(jnp.argmax(logits, -1) == targets[:, -2:]))
    # Without a mask every position counts.
    total, count, _ = trainer.loss_terms(graphdef, trainer.pure(state), batch | {"mask": None})
    full = optax.softmax_cross_entropy_with_integer_labels(model(inputs)[..., :11], targets)
    assert float(count) == 21
    np.testing.assert_allclose(total, full.sum(), rtol=1e-5)
