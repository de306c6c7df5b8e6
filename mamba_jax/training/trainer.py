"""The train state and step: sharded model/optimizer state, the one loss, the jitted train and
eval steps, and the learning-rate schedule.

The train state is a plain pytree, so jit, Orbax and the sharding rules all see the same thing:
    {"params": nested dict of arrays (nnx.to_pure_dict of the MambaLM),
     "opt_state": optax state over those params, "step": int32 (), "rng": uint32 key data,
     and with train.state_passing "carry": {"conv": (n_layer, b, d_conv - 1, e) compute dtype,
     "ssm": (n_layer, b, e, d_state) float32}, the states each batch row ended the last step with}

This module imports neither Grain nor tensorboardX at import time, so benchmarks can use the train
step on machines without them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_jax import sharding as shd
from mamba_jax.config import MambaConfig
from mamba_jax.losses import linear_cross_entropy
from mamba_jax.model import MambaCache, MambaLM, abstract_model
from mamba_jax.scan_sharding import sum_over_token_shards
from mamba_jax.training.run_config import TrainConfig


def pure(tree):
    """nnx.State (of Variables or of anything in their place) -> nested dict."""
    if isinstance(tree, nnx.State):
        return {k: pure(v) for k, v in tree.items()}
    if isinstance(tree, nnx.Variable):
        return tree.get_value()
    return tree


def decay_mask(params: dict) -> dict:
    """True for weight matrices; False for A_log, D, biases, norms and the (tied) embedding."""

    def decays(path, _):
        keys = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return keys[-1] == "kernel" and keys[0] != "embedding"

    return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(config: TrainConfig):
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `steps` (paper recipe)."""
    warmup = min(config.warmup_steps, config.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else config.lr,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(config.steps, warmup + 1),
        end_value=config.min_lr,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip) if config.grad_clip > 0 else optax.identity(),
        optax.adamw(
            lr_schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
            weight_decay=config.weight_decay, mask=decay_mask,
        ),
    )  # fmt: skip


def abstract_carry(model_config: MambaConfig, rows: int) -> dict:
    """The shapes and dtypes of the carried states of `rows` batch rows (train.state_passing)."""
    cache = jax.eval_shape(lambda: abstract_model(model_config).init_cache(rows))
    return {"conv": cache.conv, "ssm": cache.ssm}


def carry_shardings(mesh) -> dict:
    """Carried states split over data x fsdp on their batch axis, like the batch's rows."""
    sharding = NamedSharding(mesh, P(None, shd.BATCH_AXES))
    return {"conv": sharding, "ssm": sharding}


def train_state_shardings(model_config: MambaConfig, tx, mesh, carry_rows: int | None = None):
    """(graphdef, abstract train state, NamedSharding tree of the same structure). With
    `carry_rows` (the global batch, for train.state_passing) the state has a "carry"."""
    graphdef, abstract = nnx.split(abstract_model(model_config))
    param_shardings = pure(shd.param_shardings(abstract, mesh))
    params = pure(abstract)
    opt_abstract = jax.eval_shape(tx.init, params)
    opt_shardings = _mirror_shardings(opt_abstract, params, param_shardings, mesh)
    rep = shd.replicated(mesh)
    shardings = {"params": param_shardings, "opt_state": opt_shardings, "step": rep, "rng": rep}
    abstract_state = {
        "params": params,
        "opt_state": opt_abstract,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    if carry_rows is not None:
        abstract_state["carry"] = abstract_carry(model_config, carry_rows)
        shardings["carry"] = carry_shardings(mesh)
    return graphdef, abstract_state, shardings


def _mirror_shardings(opt_abstract, params, param_shardings, mesh):
    """Optimizer subtrees shaped like the params take the params' shardings; the rest replicate."""
    param_struct = jax.tree.structure(params)

    def is_param_tree(x):
        try:
            return jax.tree.structure(x) == param_struct
        except Exception:  # noqa: BLE001 - any non-matching node is simply not a param tree
            return False

    rep = shd.replicated(mesh)
    return jax.tree.map(
        lambda x: param_shardings if is_param_tree(x) else rep, opt_abstract, is_leaf=is_param_tree
    )


def init_state(model_config: MambaConfig, tx, mesh, seed: int, carry_rows: int | None = None):
    """Builds the train state directly in its sharded layout (no host-side full copy); with
    `carry_rows`, zero carried states for that many batch rows."""
    graphdef, abstract_state, shardings = train_state_shardings(model_config, tx, mesh, carry_rows)

    def init():
        params = pure(nnx.split(MambaLM(model_config, rngs=nnx.Rngs(seed)))[1])
        state = {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }
        if carry_rows is not None:
            state["carry"] = jax.tree.map(
                lambda a: jnp.zeros(a.shape, a.dtype), abstract_state["carry"]
            )
        return state

    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def _score_mask(batch) -> jax.Array:
    """(b, l) float32: 1 where a position's loss counts (batch "mask" and "padding_mask")."""
    mask = batch.get("mask")
    mask = jnp.ones(batch["targets"].shape, jnp.float32) if mask is None else mask
    mask = mask.astype(jnp.float32)
    if batch.get("padding_mask") is not None:
        mask = mask * batch["padding_mask"].astype(jnp.float32)
    return mask


def _carried_cache(carry: dict, batch) -> MambaCache:
    """The carried states as a MambaCache, zeroed in the rows whose window starts afresh."""
    keep = batch["carry"][:, 0].reshape(1, -1, 1, 1)  # (b, l), constant along l -> (1, b, 1, 1)
    return MambaCache(
        conv=carry["conv"] * keep.astype(carry["conv"].dtype),
        ssm=carry["ssm"] * keep.astype(carry["ssm"].dtype),
    )


def _next_carry(cache: MambaCache) -> dict:
    return {"conv": jax.lax.stop_gradient(cache.conv), "ssm": jax.lax.stop_gradient(cache.ssm)}


def _forward(model, batch, carry, logits: bool):
    """The model on a batch, from the carried states when `carry` is given: (out, next carry)."""
    kwargs = dict(segment_ids=batch.get("segment_ids"), padding_mask=batch.get("padding_mask"))
    run = model if logits else model.hidden_states
    if carry is None:
        return run(batch["inputs"], **kwargs), None
    out, cache = run(batch["inputs"], _carried_cache(carry, batch), **kwargs)
    return out, _next_carry(cache)


def loss_terms(graphdef, params, batch, carry=None):
    """Summed next-token cross-entropy, scored positions and correct argmax predictions.

    batch: inputs (b, l) int32, targets (b, l) int32, and optionally mask (b, l) float32 (1 where
    a position counts; synthetic tasks score only some positions), segment_ids (b, l) int32
    (packed documents, which then never see each other) and padding_mask (b, l) (0 at padded
    tokens, which neither change the states nor count). With `carry` (train.state_passing: the
    states the previous windows ended with, and batch "carry" (b, l) float32, constant along
    each row, 0 where the row starts afresh) the rows start from those states, and a fourth result is the next carry (no
    gradient flows through it)."""
    model = nnx.merge(graphdef, params)
    hidden, next_carry = _forward(model, batch, carry, logits=False)  # (b, l, d)
    targets = batch["targets"]
    mask = _score_mask(batch)
    # The tied head and the cross-entropy a chunk of positions at a time (the padded vocab rows
    # get no probability mass): the (b, l, v) logits never exist whole.
    # With the length split over the mesh, each device sums its own positions.
    ce = functools.partial(linear_cross_entropy, vocab_size=model.config.vocab_size)
    total, correct = sum_over_token_shards(
        ce,
        dict(hidden=hidden, targets=targets, mask=mask),
        dict(table=model.embedding.embedding[...]),
    )
    if carry is None:
        return total, mask.sum(), correct
    return total, mask.sum(), correct, next_carry


def reference_loss_terms(graphdef, params, batch, carry=None):
    """`loss_terms` the plain way: the whole (b, l, v) float32 logits and optax's cross-entropy.
    The reference that tests and benchmarks/train_throughput.py check loss_terms against."""
    model = nnx.merge(graphdef, params)
    logits, next_carry = _forward(model, batch, carry, logits=True)  # (b, l, v_pad)
    vocab = model.config.vocab_size
    if vocab < logits.shape[-1]:  # padded vocab rows get no probability mass
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab, logits, -jnp.inf)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (b, l)
    mask = _score_mask(batch)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)  # (b, l)
    terms = (losses * mask).sum(), mask.sum(), (correct * mask).sum()
    return terms if carry is None else (*terms, next_carry)


def make_train_step(graphdef, tx, train_config: TrainConfig, shardings, mesh, *,
                    loss=loss_terms):  # fmt: skip
    """jit'd (state, batch) -> (state, metrics); state donated, layouts explicit.

    The loss is the mean over all scored positions of the whole batch, so accumulating
    `grad_accum` micro-batches gives the same update as one large batch. `loss` is loss_terms
    (or reference_loss_terms, for checks). metrics: loss, grad_norm, lr, and nonfinite (1.0 when
    this step's loss or gradient was not finite and its update was skipped; NonfiniteGuard)."""
    accum = train_config.grad_accum
    schedule = lr_schedule(train_config)
    carrying = "carry" in shardings  # train.state_passing

    def summed(params, batch, carry):
        if carry is None:
            total, count, _ = loss(graphdef, params, batch)
            return total, (count, None)
        total, count, _, next_carry = loss(graphdef, params, batch, carry)
        return total, (count, next_carry)

    grad_fn = jax.value_and_grad(summed, has_aux=True)

    def step(state, batch):
        params, carry = state["params"], state.get("carry")
        if accum == 1:
            (total, (count, next_carry)), grads = grad_fn(params, batch, carry)
        else:
            # Micro-batch j takes rows j, j + accum, ...: each device keeps its own rows, so
            # splitting needs no communication when the local batch is a multiple of accum.
            # Carried states (rows on axis 1) split the same way.
            def split(x, axis=0):  # (..., b, ...) -> (accum, ..., b / accum, ...)
                x = jnp.moveaxis(x, axis, 0)
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jnp.moveaxis(x, 1, axis + 1)

            def join(x, axis=0):  # the inverse of split
                x = jnp.moveaxis(x, axis + 1, 1).swapaxes(0, 1)
                return jnp.moveaxis(x.reshape(-1, *x.shape[2:]), 0, axis)

            def body(sums, micro):
                micro_batch, micro_carry = micro
                (total, (count, next_carry)), grads = grad_fn(params, micro_batch, micro_carry)
                return jax.tree.map(jnp.add, sums, (total, count, grads)), next_carry

            zero = jnp.zeros((), jnp.float32)
            init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
            micro = (jax.tree.map(split, batch), jax.tree.map(lambda x: split(x, 1), carry))
            (total, count, grads), next_carry = jax.lax.scan(body, init, micro)
            next_carry = jax.tree.map(lambda x: join(x, 1), next_carry)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        # A non-finite loss or gradient skips the update: params and optimizer state stay as
        # they were (the select fuses into the optimizer's elementwise kernels), the step counts.
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = {
            "params": keep(optax.apply_updates(params, updates), params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        if carrying:  # after a skipped step the rows start afresh rather than from its states
            new_state["carry"] = keep(next_carry, jax.tree.map(jnp.zeros_like, next_carry))
        metrics = {
            "loss": total / count,
            "grad_norm": grad_norm,
            "lr": schedule(state["step"]),
            "nonfinite": 1.0 - finite.astype(jnp.float32),
        }
        return new_state, metrics

    rep = shd.replicated(mesh)
    return jax.jit(
        shd.under_mesh(step, mesh),  # the scan and the conv find the mesh: shard_map inside
        in_shardings=(shardings, shd.batch_sharding(mesh)),
        out_shardings=(shardings, {k: rep for k in ("loss", "grad_norm", "lr", "nonfinite")}),
        donate_argnums=0,
    )


class NonfiniteGuard:
    """Counts the train steps skipped for a non-finite loss or gradient (the step's `nonfinite`
    metric), and says when `limit` came in a row.

    Call `update(metrics)` after each train step. It reads the previous step's flag, which the
    device has finished (or is about to) by the time the next step is dispatched, so the loop
    never waits on the step it just launched; a run of `limit` is therefore seen one step late.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"train.max_nonfinite_steps must be >= 1, got {limit}")
        self.limit = limit
        self.in_a_row = 0
        self._total = 0
        self._pending = None

    def _read(self):
        if self._pending is not None:
            flag, self._pending = float(self._pending), None
            self._total += int(flag > 0)
            self.in_a_row = self.in_a_row + 1 if flag > 0 else 0

    def update(self, metrics) -> str | None:
        """metrics: the train step's. Returns a message once `limit` steps in a row were
        skipped (the caller saves a checkpoint and stops), else None."""
        self._read()
        self._pending = metrics["nonfinite"]
        if self.in_a_row >= self.limit:
            return (f"{self.in_a_row} train steps in a row had a non-finite loss or gradient "
                    f"(train.max_nonfinite_steps={self.limit}); their updates were skipped")  # fmt: skip
        return None

    @property
    def total(self) -> int:
        """Skipped steps so far, the latest included (this waits for it)."""
        self._read()
        return self._total


def make_eval_step(graphdef, shardings, mesh):
    """jit'd (params, batch) -> (summed loss, scored positions, correct predictions)."""
    return jax.jit(
        shd.under_mesh(lambda params, batch: loss_terms(graphdef, params, batch), mesh),
        in_shardings=(shardings["params"], shd.batch_sharding(mesh)),
        out_shardings=shd.replicated(mesh),
    )


def eval_loss(eval_step, params, batches, mesh, bytes_per_token=None, with_accuracy=False) -> dict:
    """Mean loss over `batches` (per-process numpy batches), as {"eval_loss", and "eval_bpb"
    (bits per byte) when bytes_per_token is known, and "eval_accuracy" when asked}."""
    total = count = correct = 0.0
    for batch in batches:
        t, c, k = jax.device_get(eval_step(params, global_batch(batch, mesh)))
        total, count, correct = total + float(t), count + float(c), correct + float(k)
    loss = total / max(count, 1.0)
    out = {"eval_loss": loss}
    if bytes_per_token:  # nats per token -> bits per byte
        out["eval_bpb"] = loss / math.log(2) / bytes_per_token
    if with_accuracy:
        out["eval_accuracy"] = correct / max(count, 1.0)
    return out


def global_batch(local_batch: dict, mesh) -> dict:
    """Per-process numpy arrays (b / P, ...) -> global jax.Arrays (b, ...) over data x fsdp."""
    sharding = shd.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }
