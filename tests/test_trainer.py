"""The training step: the one loss (masked positions, padded vocabulary rows), its fused pieces
against the plain expressions, the rematerialisation policy, and skipped non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLM
from mamba_jax import sharding as shd
from mamba_jax.config import MeshConfig
from mamba_jax.layers import causal_conv1d_silu, rms_norm
from mamba_jax.training import trainer
from mamba_jax.training.run_config import TrainConfig


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


# ----------------------------------------------------------------------------------------------
# The fused ops against the plain expressions, forward and VJP, fp32.


def _plain_conv_silu(x, state, kernel, bias):
    xp = jnp.concatenate([state, x], axis=1)
    w, length = kernel.shape[0], x.shape[1]
    return jax.nn.silu(sum(xp[:, k : k + length] * kernel[k] for k in range(w)) + bias)


def _check_vjp(fused, plain, args, key):
    @jax.jit
    def both(args, key):
        outs = []
        for f in (fused, plain):
            out, vjp = jax.vjp(f, *args)
            outs.append((out, vjp(jax.random.normal(key, out.shape))))
        return outs

    (out, grads), (want, want_grads) = both(args, key)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [2, 17])  # shorter than and past w - 1
def test_conv_silu_matches_the_plain_conv(length):
    e, w = 5, 4
    k = jax.random.split(jax.random.key(length), 5)
    args = (jax.random.normal(k[0], (2, length, e)), jax.random.normal(k[1], (2, w - 1, e)),
            jax.random.normal(k[2], (w, e)), jax.random.normal(k[3], (e,)))  # fmt: skip
    fused = lambda *a: causal_conv1d_silu(*a, jnp.dtype(jnp.float32))
    _check_vjp(fused, _plain_conv_silu, args, k[4])


def test_rms_norm_matches_the_plain_norm():
    k = jax.random.split(jax.random.key(0), 3)
    x, weight = 3 * jax.random.normal(k[0], (2, 7, 33)), jax.random.normal(k[1], (33,))
    plain = lambda x, w: x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-5) * w
    _check_vjp(lambda x, w: rms_norm(x, w, 1e-5, jnp.dtype(jnp.float32)), plain, (x, weight), k[2])


# ----------------------------------------------------------------------------------------------
# The step's loss and gradients against the plain step's.

TINY = MambaConfig(d_model=16, n_layer=2, vocab_size=29, scan_impl="reference")


def _grads(config, loss, params, batch):
    graphdef = nnx.graphdef(MambaLM(config, rngs=nnx.Rngs(0)))
    fn = jax.jit(jax.value_and_grad(lambda p, b: loss(graphdef, p, b)[0]))
    return fn(params, batch)


def test_step_loss_and_gradients_equal_the_plain_step():
    """Chunked cross-entropy, fused conv/norm, two-matmul in_proj, without and with the
    rematerialisation policy, layers scanned or unrolled, against whole logits + optax without
    remat: the same function."""
    params = trainer.pure(nnx.state(MambaLM(TINY, rngs=nnx.Rngs(0))))
    k = jax.random.split(jax.random.key(1), 3)
    batch = {"inputs": jax.random.randint(k[0], (2, 13), 0, 29),
             "targets": jax.random.randint(k[1], (2, 13), 0, 29),
             "mask": (jax.random.uniform(k[2], (2, 13)) > 0.2).astype(jnp.float32)}  # fmt: skip
    want, want_grads = _grads(TINY, trainer.reference_loss_terms, params, batch)
    variants = [
        (False, False, True, None),
        (True, False, True, None),
        (True, True, True, None),
        (False, False, False, None),
        (True, True, False, None),
        (True, True, False, 1),
    ]
    for remat, keep_scan, scan_layers, keep_layers in variants:
        config = TINY.replace(remat=remat, remat_keep_scan=keep_scan, scan_layers=scan_layers,
                              remat_keep_scan_layers=keep_layers)  # fmt: skip
        got, grads = _grads(config, trainer.loss_terms, params, batch)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            ref = want_grads
            for key in path:
                ref = ref[key.key]
            scale = max(1.0, float(jnp.max(jnp.abs(ref))))
            np.testing.assert_allclose(
                g,
                ref,
                rtol=1e-4,
                atol=1e-5 * scale,
                err_msg=f"{remat=} {keep_scan=} {scan_layers=} {keep_layers=} {path}",
            )


def test_remat_keeps_only_the_named_residuals():
    """Under remat a layer's backward keeps the block input and the in_proj and x_proj outputs;
    without it, more (the conv output, Δ, the scan's inputs ...)."""
    from jax._src.ad_checkpoint import saved_residuals

    cfg = TINY.replace(d_model=32, dtype="bfloat16")
    params = trainer.pure(nnx.state(MambaLM(cfg, rngs=nnx.Rngs(0))))
    batch = {"inputs": jnp.zeros((2, 24), jnp.int32), "targets": jnp.zeros((2, 24), jnp.int32)}

    def stacked(remat, keep_scan=False):  # residuals shaped (n_layer, b, l, ...): per layer
        config = cfg.replace(remat=remat, remat_keep_scan=keep_scan)
        graphdef = nnx.graphdef(MambaLM(config, rngs=nnx.Rngs(0)))
        res = saved_residuals(lambda p, b: trainer.loss_terms(graphdef, p, b)[0], params, batch)
        return sorted((a.dtype.name, a.shape[3]) for a, _ in res if a.shape[:3] == (2, 2, 24))

    e, r = cfg.d_inner, cfg.dt_rank + 2 * cfg.d_state
    want = [("bfloat16", e), ("bfloat16", e), ("bfloat16", r), ("float32", cfg.d_model)]
    assert stacked(True) == sorted(want)
    # remat_keep_scan adds the scan's output (and, with a fused kernel, its state checkpoints:
    # tests/test_pallas_kernels.py checks those on the lowered kernel step).
    assert stacked(True, keep_scan=True) == sorted([*want, ("bfloat16", e)])
    assert len(stacked(False)) > 4

    def per_layer(keep_layers):  # unrolled: a layer's residuals are (b, l, ...) of their own
        config = cfg.replace(remat=True, remat_keep_scan=True, scan_layers=False,
                             remat_keep_scan_layers=keep_layers)  # fmt: skip
        graphdef = nnx.graphdef(MambaLM(config, rngs=nnx.Rngs(0)))
        res = saved_residuals(lambda p, b: trainer.loss_terms(graphdef, p, b)[0], params, batch)
        return sorted((a.dtype.name, a.shape[2]) for a, _ in res
                      if a.shape[:2] == (2, 24) and a.ndim == 3)  # fmt: skip

    # Two layers: x, z and x_dbl each, y in the layers that keep the scan (widths e and r; the
    # rest are the block inputs and the head's, outside the question).
    for keep in (0, 1, 2):
        got = [x for x in per_layer(keep) if x[1] in (e, r)]
        assert got == sorted(2 * want[:3] + keep * [("bfloat16", e)]), (keep, got)


# ----------------------------------------------------------------------------------------------
# Non-finite steps.


def test_a_nonfinite_step_changes_nothing_but_the_step_and_is_counted():
    mesh = shd.make_mesh(MeshConfig(-1, 1, 1))  # the 8 fake CPU devices
    tc = TrainConfig(steps=10, batch_size=8, seq_len=8, warmup_steps=0)
    tx = trainer.make_optimizer(tc)
    graphdef, state, shardings = trainer.init_state(TINY, tx, mesh, seed=0)
    step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    ids = np.arange(64, dtype=np.int32).reshape(8, 8) % 29
    good = {"inputs": ids, "targets": ids, "mask": np.ones((8, 8), np.float32)}
    bad = good | {"mask": np.full((8, 8), np.nan, np.float32)}
    state, metrics = step(state, trainer.global_batch(good, mesh))
    assert float(metrics["nonfinite"]) == 0.0
    before = jax.device_get(state)
    state, metrics = step(state, trainer.global_batch(bad, mesh))
    assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
    after = jax.device_get(state)
    assert int(after["step"]) == int(before["step"]) + 1
    for a, b in zip(jax.tree.leaves(after["params"]), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(after["opt_state"]), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, trainer.global_batch(good, mesh))  # training goes on
    assert float(metrics["nonfinite"]) == 0.0
    assert np.all(np.isfinite(jax.tree.leaves(jax.device_get(state["params"]))[0]))


def test_nonfinite_guard_stops_after_limit_in_a_row():
    guard = trainer.NonfiniteGuard(3)
    flags = [1, 1, 0, 1, 1, 1, 1]  # the run of three ends at index 5, seen one update later
    said = [guard.update({"nonfinite": jnp.float32(f)}) for f in flags]
    assert said[:6] == [None] * 6 and "3 train steps in a row" in said[6]
    assert guard.total == 6
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        trainer.NonfiniteGuard(0)
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        TrainConfig(max_nonfinite_steps=0)


# ----------------------------------------------------------------------------------------------
# State passing (train.state_passing): windows of one stream with carried states.


def _stream_batch(inputs, targets, carry, segments):
    b, length = inputs.shape
    return {"inputs": inputs, "targets": targets, "segment_ids": segments,
            "carry": np.full((b, length), carry, np.float32)}  # fmt: skip


def test_windows_with_carried_states_give_the_long_sequence_loss():
    """Two windows of 9 with the first one's states carried into the second give the same
    summed loss as one forward over all 18 tokens; with carry 0 the second window starts
    afresh, as if it were alone; the chunked loss and the reference agree on both."""
    model = MambaLM(TINY, rngs=nnx.Rngs(3))
    graphdef, params = nnx.graphdef(model), trainer.pure(nnx.state(model))
    k = jax.random.split(jax.random.key(4), 2)
    inputs = np.asarray(jax.random.randint(k[0], (3, 18), 0, 29), np.int32)
    targets = np.asarray(jax.random.randint(k[1], (3, 18), 0, 29), np.int32)
    segments = np.zeros((3, 18), np.int32)
    segments[1, 11:] = 1  # a document starting inside the second window
    segments[2, 9:] = 1  # and one starting with it: the carried state must not reach it
    whole = {"inputs": inputs, "targets": targets, "segment_ids": segments}
    want, count, _ = trainer.loss_terms(graphdef, params, whole)
    zero = {k: np.zeros(v.shape, v.dtype) for k, v in trainer.abstract_carry(TINY, 3).items()}
    for loss in (trainer.loss_terms, trainer.reference_loss_terms):
        carry, total, n = zero, 0.0, 0.0
        for s in (0, 9):
            keep = np.asarray([s > 0, s > 0, False], np.float32)[:, None]
            window = _stream_batch(inputs[:, s : s + 9], targets[:, s : s + 9], keep,
                                   segments[:, s : s + 9])  # fmt: skip
            t, c, _, carry = loss(graphdef, params, window, carry)
            total, n = total + t, n + c
        np.testing.assert_allclose(total, want, rtol=1e-5)
        assert float(n) == float(count) == 54
    # Carry 0: the second window alone.
    t, _, _, _ = trainer.loss_terms(
        graphdef,
        params,
        _stream_batch(inputs[:, 9:], targets[:, 9:], 0.0, segments[:, 9:]),
        {k: v + 1.0 for k, v in zero.items()},  # whatever the states were
    )
    alone, _, _ = trainer.loss_terms(
        graphdef,
        params,
        {
            "inputs": inputs[:, 9:],
            "targets": targets[:, 9:],
            "segment_ids": segments[:, 9:],
        },  # fmt: skip
    )
    np.testing.assert_allclose(t, alone, rtol=1e-6)


def test_state_passing_step_carries_states_and_splits_them_over_micro_batches():
    """The train step with a carry: grad_accum 2 gives the loss, parameters and next carry of
    grad_accum 1 (the rows split and join back in place); the carry after a step is the
    states the rows ended with; a non-finite step resets it to zero."""
    mesh = shd.make_mesh(MeshConfig(-1, 1, 1))  # the 8 fake CPU devices
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 29, (16, 9)).astype(np.int32)
    batch = _stream_batch(ids, np.roll(ids, -1, 1), 1.0, np.zeros((16, 9), np.int32))
    results = []
    for accum in (1, 2):
        tc = TrainConfig(steps=10, batch_size=16, seq_len=9, warmup_steps=0, grad_accum=accum,
                         state_passing=True)  # fmt: skip
        tx = trainer.make_optimizer(tc)
        graphdef, state, shardings = trainer.init_state(TINY, tx, mesh, 0, carry_rows=16)
        assert shardings["carry"]["ssm"].spec == shd.P(None, shd.BATCH_AXES)
        step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
        params = jax.device_get(state["params"])
        state, metrics = step(state, trainer.global_batch(batch, mesh))
        results.append(jax.device_get((metrics["loss"], state["params"], state["carry"])))
    (loss1, params1, carry1), (loss2, params2, carry2) = results
    np.testing.assert_allclose(loss2, loss1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for name in ("conv", "ssm"):
        np.testing.assert_allclose(carry2[name], carry1[name], rtol=1e-5, atol=1e-6)
    # The carry is the cache the rows end with, from the parameters before the update.
    model = nnx.merge(graphdef, params)
    _, cache = model.hidden_states(ids, model.init_cache(16))
    np.testing.assert_allclose(carry1["ssm"], cache.ssm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(carry1["conv"], cache.conv, rtol=1e-5, atol=1e-6)
    assert np.abs(carry1["ssm"]).max() > 0
    bad = batch | {"carry": np.full((16, 9), np.nan, np.float32)}
    state, metrics = step(state, trainer.global_batch(bad, mesh))
    assert float(metrics["nonfinite"]) == 1.0
    for leaf in jax.tree.leaves(jax.device_get(state["carry"])):
        np.testing.assert_array_equal(leaf, 0.0)


def test_state_passing_needs_a_corpus():
    from mamba_jax.training.run_config import load_config

    with pytest.raises(ValueError, match="state_passing=true streams a corpus"):
        load_config(None, ["train.state_passing=true", "data.task=selective_copying"])


def test_state_passing_on_sharded_meshes_equals_one_device_layout():
    """Three steps with carried states on data x fsdp x sequence and tensor x sequence meshes
    (the scan's initial and final states cross the sequence shards) give the data-parallel
    run's loss and carry."""
    cfg = TINY.replace(scan_impl="associative")
    rng = np.random.default_rng(6)
    ids = rng.integers(0, 29, (8, 16)).astype(np.int32)
    segments = np.zeros((8, 16), np.int32)
    segments[:, 5:] = 1
    batch = _stream_batch(ids, np.roll(ids, -1, 1), 1.0, segments)
    tc = TrainConfig(steps=10, batch_size=8, seq_len=16, warmup_steps=0, state_passing=True)
    tx = trainer.make_optimizer(tc)
    out = []
    for sizes in ((-1, 1, 1, 1), (2, 2, 1, 2), (1, 1, 2, 4)):
        mesh = shd.make_mesh(MeshConfig(*sizes))
        graphdef, state, shardings = trainer.init_state(cfg, tx, mesh, 0, carry_rows=8)
        step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
        for _ in range(3):
            state, metrics = step(state, trainer.global_batch(batch, mesh))
        out.append((float(metrics["loss"]), jax.device_get(state["carry"])))
    for loss, carry in out[1:]:
        np.testing.assert_allclose(loss, out[0][0], rtol=1e-4)
        for name in ("conv", "ssm"):
            np.testing.assert_allclose(carry[name], out[0][1][name], rtol=1e-3, atol=1e-5)


def test_padded_positions_get_no_loss_and_change_nothing():
    """A batch with padding_mask: the summed loss and count equal those of the rows without
    their padding (right-padded here, left-padded in the second row)."""
    model = MambaLM(TINY, rngs=nnx.Rngs(7))
    graphdef, params = nnx.graphdef(model), trainer.pure(nnx.state(model))
    rng = np.random.default_rng(8)
    ids, targets = rng.integers(0, 29, (2, 2, 11)).astype(np.int32)
    real = np.ones((2, 11), bool)
    real[0, 7:] = False  # right padding
    real[1, :3] = False  # left padding
    batch = {"inputs": ids, "targets": targets, "padding_mask": real}
    total, count, _ = trainer.loss_terms(graphdef, params, batch)
    want = [trainer.loss_terms(graphdef, params, {"inputs": ids[r : r + 1, real[r]],
                                                  "targets": targets[r : r + 1, real[r]]})
            for r in range(2)]  # fmt: skip
    assert float(count) == 7 + 8
    np.testing.assert_allclose(total, want[0][0] + want[1][0], rtol=1e-5)
    ref_total, ref_count, _ = trainer.reference_loss_terms(graphdef, params, batch)
    np.testing.assert_allclose(ref_total, total, rtol=1e-5)
    assert float(ref_count) == 15


@pytest.mark.gpu
@pytest.mark.parametrize(
    "remat, keep_scan, scan_layers", [(False, False, True), (True, True, True), (True, True, False)]
)
def test_the_forward_kernel_runs_once_per_layer_in_a_train_step(
    remat, keep_scan, scan_layers, tmp_path
):
    """Profiled on the GPU: one forward-kernel launch per layer and step, without remat and with
    remat that keeps the scan, the layers scanned or unrolled (XLA's dynamic-slice fusion once
    cloned the call; see pallas_kernels/NOTES.md, 2026-12-03)."""
    import collections

    from benchmarks import profile_summary

    n_layer, steps = 3, 2
    config = MambaConfig(d_model=256, n_layer=n_layer, vocab_size=512, dtype="bfloat16",
                         scan_impl="pallas", remat=remat, remat_keep_scan=keep_scan,
                         scan_layers=scan_layers)  # fmt: skip
    mesh = shd.make_mesh(MeshConfig(-1, 1, 1))
    tc = TrainConfig(steps=10, batch_size=4, seq_len=512, warmup_steps=1)
    tx = trainer.make_optimizer(tc)
    graphdef, state, shardings = trainer.init_state(config, tx, mesh, seed=0)
    step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    tokens = np.random.default_rng(0).integers(0, 512, (4, 513)).astype(np.int32)
    batch = trainer.global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, mesh)
    state, metrics = step(state, batch)  # compile outside the trace
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    launches = collections.Counter(e.name for e in profile_summary.device_ops(tmp_path))
    fwd = {k: v for k, v in launches.items() if "selective_scan_fwd" in k}
    bwd = {k: v for k, v in launches.items() if k.startswith("selective_scan_bwd_mosaic")}
    assert bwd and set(bwd.values()) == {n_layer * steps}, launches
    assert fwd and set(fwd.values()) == {n_layer * steps}, launches
