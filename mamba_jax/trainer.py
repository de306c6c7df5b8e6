"""The pieces train.py assembles: sharded model/optimizer state, the jitted train and eval steps,
the learning-rate schedule, MFU, and the metrics writers.

The train state is a plain pytree, so jit, Orbax and the sharding rules all see the same thing:
    {"params": nested dict of arrays (nnx.to_pure_dict of the MambaLM),
     "opt_state": optax state over those params, "step": int32 (), "rng": uint32 key data}

This module imports neither Grain nor tensorboardX at import time, so benchmarks can use the train
step on machines without them.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mamba_jax import sharding as shd
from mamba_jax.config import MambaConfig, TrainConfig
from mamba_jax.model import MambaLM

# Dense bf16 peak per chip, for MFU (BENCHMARKS.md uses 989 TFLOP/s for the H100).
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def abstract_model(model_config: MambaConfig):
    """(graphdef, abstract nnx.State) of a MambaLM, allocating nothing."""
    model = nnx.eval_shape(lambda: MambaLM(model_config, rngs=nnx.Rngs(0)))
    return nnx.split(model)


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


def state_shardings(model_config: MambaConfig, tx, mesh):
    """(graphdef, abstract train state, NamedSharding tree of the same structure)."""
    graphdef, abstract = abstract_model(model_config)
    param_shardings = pure(shd.state_shardings(abstract, mesh))
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


def init_state(model_config: MambaConfig, tx, mesh, seed: int):
    """Builds the train state directly in its sharded layout (no host-side full copy)."""
    graphdef, abstract_state, shardings = state_shardings(model_config, tx, mesh)

    def init():
        params = pure(nnx.split(MambaLM(model_config, rngs=nnx.Rngs(seed)))[1])
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed + 1)),
        }

    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, shardings


def loss_terms(graphdef, params, batch):
    """Summed next-token cross-entropy, scored positions and correct argmax predictions.

    batch: inputs (b, l) int32, targets (b, l) int32, and optionally mask (b, l) float32 (1 where
    a position counts; synthetic tasks score only some positions)."""
    model = nnx.merge(graphdef, params)
    logits = model(batch["inputs"])  # (b, l, v) float32
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # (b, l)
    mask = batch.get("mask")
    mask = jnp.ones_like(losses) if mask is None else mask.astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)  # (b, l)
    return (losses * mask).sum(), mask.sum(), (correct * mask).sum()


def make_train_step(graphdef, tx, train_config: TrainConfig, shardings, mesh):
    """jit'd (state, batch) -> (state, metrics); state donated, layouts explicit.

    The loss is the mean over all scored positions of the whole batch, so accumulating
    `grad_accum` micro-batches gives the same update as one large batch."""
    accum = train_config.grad_accum
    schedule = lr_schedule(train_config)

    def summed(params, batch):
        total, count, _ = loss_terms(graphdef, params, batch)
        return total, count

    grad_fn = jax.value_and_grad(summed, has_aux=True)

    def step(state, batch):
        params = state["params"]
        if accum == 1:
            (total, count), grads = grad_fn(params, batch)
        else:
            # Micro-batch j takes rows j, j + accum, ...: each device keeps its own rows, so
            # splitting needs no communication when the local batch is a multiple of accum.
            def split(x):  # (b, ...) -> (accum, b / accum, ...)
                return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)

            def body(carry, micro):
                (total, count), grads = grad_fn(params, micro)
                return jax.tree.map(jnp.add, carry, (total, count, grads)), None

            zero = jnp.zeros((), jnp.float32)
            init = (zero, zero, jax.tree.map(jnp.zeros_like, params))
            (total, count, grads), _ = jax.lax.scan(body, init, jax.tree.map(split, batch))
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": total / count,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
        }
        return new_state, metrics

    rep = shd.replicated(mesh)
    return jax.jit(
        step,
        in_shardings=(shardings, shd.batch_sharding(mesh)),
        out_shardings=(shardings, {"loss": rep, "grad_norm": rep, "lr": rep}),
        donate_argnums=0,
    )


def make_eval_step(graphdef, shardings, mesh):
    """jit'd (params, batch) -> (summed loss, scored positions, correct predictions)."""
    return jax.jit(
        lambda params, batch: loss_terms(graphdef, params, batch),
        in_shardings=(shardings["params"], shd.batch_sharding(mesh)),
        out_shardings=shd.replicated(mesh),
    )


def global_batch(local_batch: dict, mesh) -> dict:
    """Per-process numpy arrays (b / P, ...) -> global jax.Arrays (b, ...) over data x fsdp."""
    sharding = shd.batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def count_params(params) -> int:
    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(params))


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def mfu(n_params: int, tokens_per_sec: float, num_devices: int, device=None) -> float | None:
    """Model FLOPs utilisation by the 6N rule (BENCHMARKS.md); None on unknown devices (CPU)."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return 6.0 * n_params * tokens_per_sec / (peak * num_devices)


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard events, from process 0 only.

    `start_step` is the step the run starts from: records after it (logged by an earlier run
    that died before its next checkpoint) are dropped, so a resumed run's metrics.jsonl holds
    each step once, in order. A fresh run (start_step 0) starts a fresh file."""

    def __init__(self, directory: str, tensorboard: bool = True, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metrics.jsonl")
        kept = []
        if os.path.exists(path) and start_step > 0:
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    if record.get("step", 0) <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        self.jsonl = open(path, "w")  # noqa: SIM115
        self.jsonl.writelines(kept)
        self.jsonl.flush()
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: (None if v is None else float(v)) for k, v in metrics.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if value is not None:
                    self.tb.add_scalar(key, float(value), int(step))

    def text(self, tag: str, text: str, step: int):
        if self.tb is not None:
            self.tb.add_text(tag, text, int(step))

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
