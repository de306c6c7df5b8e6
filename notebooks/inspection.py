"""Looking inside the selective scan: discretisation, per-layer intermediates, and scan costs.

These helpers back the notebooks in this folder (they import it as `inspection`): they compute what the paper's figures show (the decay
exp(Δ A), the Δ, B and C a trained model produces token by token, the work and depth of the
parallel scan, and memory and time as the length grows) with the package's own code paths.

(Named `inspection`, not `inspect`, so that it never shadows the standard library's `inspect`.)
"""

from __future__ import annotations

import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.scan import IMPLS, selective_scan

DISCRETIZATIONS = ("zoh", "euler")


# ----------------------------------------------------------------------------------------------
# Continuous to discrete.


def discretize(delta, A, B, method="zoh"):
    """The discrete (A_bar, B_bar) of one step, per channel and state.

    Args:
      delta: (..., e) the step Δ', already biased and softplus-ed (positive).
      A: (e, n), negative (A = -exp(A_log)).
      B: (..., n), with the same leading dimensions as delta.
      method: "zoh" (zero-order hold, paper eq. 4: B_bar = (exp(Δ A) - 1) / A · B) or "euler"
        (B_bar = Δ B, the simplification Mamba's kernel uses; paper section 3.5).

    Returns:
      A_bar, B_bar: (..., e, n). A_bar = exp(Δ A) under both methods.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"method must be one of {DISCRETIZATIONS}, got {method!r}")
    delta, A, B = (jnp.asarray(x, jnp.float32) for x in (delta, A, B))
    if A.ndim != 2 or delta.shape[-1:] != A.shape[:1]:
        raise ValueError(
            f"A must have shape (e, n) with e = delta.shape[-1]; got A {tuple(A.shape)}, "
            f"delta {tuple(delta.shape)}"
        )
    if B.shape != (*delta.shape[:-1], A.shape[1]):
        raise ValueError(
            f"B must have shape (..., n)={(*delta.shape[:-1], A.shape[1])}, got {tuple(B.shape)}"
        )
    dA = delta[..., None] * A  # (..., e, n)
    A_bar = jnp.exp(dA)
    if method == "euler":
        return A_bar, delta[..., None] * B[..., None, :]
    # expm1 keeps small Δ A accurate; as A -> 0 the ZOH factor tends to Δ, the Euler value.
    safe_A = jnp.where(A == 0, 1.0, A)
    factor = jnp.where(A == 0, delta[..., None], jnp.expm1(dA) / safe_A)  # (..., e, n)
    return A_bar, factor * B[..., None, :]


# ----------------------------------------------------------------------------------------------
# What the mixers compute, layer by layer.


class SSMIntermediates(NamedTuple):
    """The selective scan's inputs in every layer, stacked on a leading (n_layer,) axis."""

    hidden: jax.Array  # (n_layer + 1, b, l, d) residual stream entering each block, then the last
    u: jax.Array  # (n_layer, b, l, e) the scan input, after the causal conv and silu
    delta: jax.Array  # (n_layer, b, l, e) Δ before bias and softplus, as the mixer computes it
    dt: jax.Array  # (n_layer, b, l, e) Δ' = softplus(delta + dt_proj.bias), the step the scan uses
    B: jax.Array  # (n_layer, b, l, n)
    C: jax.Array  # (n_layer, b, l, n)
    z: jax.Array  # (n_layer, b, l, e) the gate branch


@nnx.jit
def _intermediates(model, input_ids):
    x = model.embedding(input_ids).astype(jnp.float32)  # (b, l, d)

    def body(x, block):
        u, delta, B, C, z, _ = block.mixer.scan_inputs(block.norm(x))
        bias = block.mixer.dt_proj.bias[...].astype(jnp.float32)
        dt = jax.nn.softplus(delta.astype(jnp.float32) + bias)  # (b, l, e)
        return block(x), (x, u, delta, dt, B, C, z)

    last, (xs, u, delta, dt, B, C, z) = nnx.scan(
        body, in_axes=(nnx.Carry, 0), out_axes=(nnx.Carry, 0)
    )(x, model.layers)
    hidden = jnp.concatenate([xs, last[None]], axis=0)  # (n_layer + 1, b, l, d)
    return SSMIntermediates(hidden, u, delta, dt, B, C, z)


def ssm_intermediates(model, input_ids) -> SSMIntermediates:
    """Runs `model` (a MambaLM) on input_ids (b, l) and returns every layer's scan inputs.

    The block outputs come from the model's own blocks, so hidden[i + 1] is exactly what layer i
    hands on; the scan inputs come from the same projections the mixer applies.
    """
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be an integer array of shape (b, l), "
            f"got {input_ids.dtype} {tuple(input_ids.shape)}"
        )
    return _intermediates(model, input_ids)


# ----------------------------------------------------------------------------------------------
# The implementations, side by side.


def _run_impl(impl, args, interpret):
    """(y, final state, how it ran) of one implementation, or raises what refused the call."""
    if impl == "pallas" and (interpret or jax.default_backend() != "gpu"):
        import pallas_kernels

        y, h = pallas_kernels.selective_scan_pallas(*args, delta_softplus=True, interpret=True)
        return y, h, "pallas_kernels.selective_scan_pallas(..., interpret=True)"
    y, h = selective_scan(*args, delta_softplus=True, return_final_state=True, impl=impl)
    return y, h, f"selective_scan(..., impl={impl!r}) on {jax.default_backend()}"


def scan_agreement(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    *,
    impls=("associative", "pallas"),
    interpret=None,
) -> dict:
    """Runs each implementation of the selective scan (delta_softplus=True) on the same inputs
    and compares it with impl="reference".

    The Pallas kernel runs for real on a GPU and in interpret mode elsewhere (or wherever
    interpret=True). Returns {impl: {"how", "max_abs_y", "max_abs_h", "ref_max_abs_y"}}; an
    implementation that cannot run here gets {"how", "skipped": the reason} instead.
    """
    for impl in impls:
        if impl not in IMPLS or impl == "auto":
            raise ValueError(f"impls must name implementations out of {IMPLS[1:]}, got {impl!r}")
    args = (u, delta, A, B, C, D, z, delta_bias)
    y_ref, h_ref, _ = _run_impl("reference", args, False)
    out = {}
    for impl in impls:
        try:
            y, h, how = _run_impl(impl, args, interpret)
        except (ImportError, ValueError, NotImplementedError) as err:
            out[impl] = {"how": impl, "skipped": f"{type(err).__name__}: {err}"}
            continue
        f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
        out[impl] = {
            "how": how,
            "max_abs_y": float(jnp.max(jnp.abs(f32(y) - f32(y_ref)))),
            "max_abs_h": float(jnp.max(jnp.abs(f32(h) - f32(h_ref)))),
            "ref_max_abs_y": float(jnp.max(jnp.abs(f32(y_ref)))),
        }
    return out


# ----------------------------------------------------------------------------------------------
# Grouping what the scan sees by the kind of token at each position.


def token_kinds(task, inputs):
    """(b, l) labels "noise", "marker" or "data" of a SelectiveCopying batch's inputs (b, l)."""
    inputs = np.asarray(inputs)
    if inputs.ndim != 2 or not np.issubdtype(inputs.dtype, np.integer):
        raise ValueError(
            f"inputs must be an integer array of shape (b, l), got {inputs.dtype} {inputs.shape}"
        )
    return np.where(
        inputs == task.noise, "noise", np.where(inputs == task.marker, "marker", "data")
    )


def mean_by_kind(values, kinds) -> dict:
    """values: (b, l, ...) per position; kinds: (b, l) labels. Returns {label: the mean of values
    over the positions with that label, shape (...)}, labels in order of first appearance."""
    values, kinds = np.asarray(values, np.float64), np.asarray(kinds)
    if values.shape[:2] != kinds.shape:
        raise ValueError(
            f"kinds must have shape values.shape[:2]={values.shape[:2]}, got {kinds.shape}"
        )
    return {k: values[kinds == k].mean(axis=0) for k in dict.fromkeys(kinds.ravel().tolist())}


def selectivity(values, kinds, on="data", off="noise"):
    """values: (b, l, e) per position and channel (Δ', say). The ratio, per channel, of the mean
    on positions labelled `on` to the mean on positions labelled `off`: (e,). An LTI layer, whose
    Δ' is the same everywhere, gives exactly 1 in every channel."""
    means = mean_by_kind(values, kinds)
    for label in (on, off):
        if label not in means:
            raise ValueError(f"kinds must contain {label!r}, got {sorted(means)}")
    return means[on] / means[off]


# ----------------------------------------------------------------------------------------------
# Work and depth of the parallel scan.


def associative_scan_work_depth(length: int) -> dict:
    """Counts the combine steps `lax.associative_scan` issues for a sequence of `length`.

    The combine function is traced, never run: every call is one parallel step (depth) and its
    leading size is how many pairs that step combines (work).
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    calls = []

    def combine(a, b):
        if a.shape[0]:  # the recursion also issues empty combines, which do no work
            calls.append(a.shape[0])
        return a + b

    jax.make_jaxpr(lambda x: jax.lax.associative_scan(combine, x))(
        jax.ShapeDtypeStruct((length,), jnp.float32)
    )
    return {"length": length, "work": sum(calls), "depth": len(calls)}


def scan_work_depth(length: int, chunk: int) -> dict:
    """Combines and parallel steps of each scan for `length` tokens (per channel and state).

    sequential: one combine per token, one after another.
    associative: one `lax.associative_scan` over the whole sequence.
    chunked: `impl="associative"`: associative scans inside chunks of `chunk` (the last one
      padded), which run one after another; each then applies the incoming state to all its
      positions, one more parallel step of `chunk` multiply-adds.
    """
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    full = associative_scan_work_depth(length)
    t = min(chunk, length)
    n_chunks = -(-length // t)
    inner = associative_scan_work_depth(t)
    return {
        "length": length,
        "sequential": {"work": length, "depth": length},
        "associative": {"work": full["work"], "depth": full["depth"]},
        "chunked": {
            "work": n_chunks * (inner["work"] + t),
            "depth": n_chunks * (inner["depth"] + 1),
        },
    }


# ----------------------------------------------------------------------------------------------
# Memory and wall time as the length grows.


def _random_scan_inputs(key, b, length, e, n):
    ks = jax.random.split(key, 6)
    u = jax.random.normal(ks[0], (b, length, e), jnp.float32)  # (b, l, e)
    delta = jax.random.normal(ks[1], (b, length, e), jnp.float32) - 2.0
    A = -jnp.exp(jax.random.normal(ks[2], (e, n), jnp.float32))  # (e, n)
    B = jax.random.normal(ks[3], (b, length, n), jnp.float32)  # (b, l, n)
    C = jax.random.normal(ks[4], (b, length, n), jnp.float32)
    z = jax.random.normal(ks[5], (b, length, e), jnp.float32)
    return u, delta, A, B, C, z


def measure_scan(impl, length, *, b=1, e=64, n=16, grad=False, reps=5, seed=0) -> dict:
    """Compiles selective_scan for one size and measures it on the default backend.

    Returns a dict with the size, XLA's memory_analysis() bytes of the compiled program (temp,
    argument, output) and the median wall time in ms over `reps` runs after one warm-up.
    With grad=True the program is forward + backward (the gradient of sum(y) w.r.t. u, delta,
    A, B, C).
    """
    if impl not in IMPLS or impl == "auto":
        raise ValueError(f"impl must be one of {IMPLS[1:]}, got {impl!r}")
    args = _random_scan_inputs(jax.random.key(seed), b, length, e, n)

    def forward(u, delta, A, B, C, z):
        return selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, impl=impl)

    fn = jax.grad(lambda *a: jnp.sum(forward(*a)), argnums=(0, 1, 2, 3, 4)) if grad else forward
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return {
        "impl": impl,
        "length": length,
        "b": b,
        "e": e,
        "n": n,
        "grad": grad,
        "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "argument_bytes": int(mem.argument_size_in_bytes) if mem is not None else None,
        "output_bytes": int(mem.output_size_in_bytes) if mem is not None else None,
        "ms": 1e3 * statistics.median(times),
    }


# ----------------------------------------------------------------------------------------------
# A small single-device training loop for the synthetic tasks, for exploring on a laptop.
# (train.py is the sharded, checkpointed trainer; this one trades all of that for brevity.)


def fit_task(model, task, *, steps, batch_size, lr=3e-3, seed=0, log_every=25):
    """Trains `model` in place on fresh examples of `task` (from mamba_jax.training.tasks) with the
    training package's own optimizer and step (AdamW, linear warmup, cosine decay, gradient
    clipping at 1) on one device. Returns the logged history, a list of
    {"step", "loss", "accuracy", "seconds"}: the step's loss, and the accuracy on the scored
    positions of the same training batch after the update."""
    from mamba_jax import sharding as shd
    from mamba_jax.config import MeshConfig
    from mamba_jax.training import trainer
    from mamba_jax.training.run_config import TrainConfig
    from mamba_jax.training.tasks import task_batch

    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps=} {batch_size=}")
    config = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=task.seq_len,
        lr=lr,
        warmup_steps=min(100, steps // 10 + 1),
        seed=seed,
    )
    mesh = shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = trainer.make_optimizer(config)
    graphdef, _, shardings = trainer.train_state_shardings(model.config, tx, mesh)
    params = trainer.pure(nnx.state(model))
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }
    state = jax.device_put(state, shardings)
    train_step = trainer.make_train_step(graphdef, tx, config, shardings, mesh)
    eval_step = trainer.make_eval_step(graphdef, shardings, mesh)
    history, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        batch = trainer.global_batch(task_batch(task, seed, step * batch_size, batch_size), mesh)
        state, metrics = train_step(state, batch)
        if step % log_every == 0 or step == steps:
            _, count, correct = eval_step(state["params"], batch)
            history.append(
                {
                    "step": step,
                    "loss": float(metrics["loss"]),
                    "accuracy": float(correct) / max(float(count), 1.0),
                    "seconds": time.perf_counter() - start,
                }
            )
    trained = nnx.state(model)
    nnx.replace_by_pure_dict(trained, state["params"])
    nnx.update(model, trained)
    return history
