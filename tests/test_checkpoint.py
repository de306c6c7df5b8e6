"""Checkpoints: exact resume, recovery after SIGKILL, save on SIGTERM, restore onto another mesh."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from mamba_jax import load_model
from mamba_jax import sharding as shd
from mamba_jax.config import MambaConfig, MeshConfig
from mamba_jax.training import trainer
from mamba_jax.training.checkpoint import Checkpointer, read_run_config, restore_model
from mamba_jax.training.run_config import CheckpointConfig, TrainConfig
from tests.conftest import ROOT, complete_steps, losses, run_train
from tests.conftest import train_args as args


def test_resume_gives_identical_losses(tmp_path):
    k = 4
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(args(tmp_path, straight, **{"train.steps": 2 * k, "checkpoint.every": k}))
    first, _ = run_train(
        args(tmp_path, resumed, **{"train.steps": 2 * k, "train.stop_at": k, "checkpoint.every": k})
    )
    assert first["step"] == k and complete_steps(resumed) == [k]
    second, _ = run_train(args(tmp_path, resumed, **{"train.steps": 2 * k, "checkpoint.every": k}))
    assert second["step"] == 2 * k
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 2 * k + 1))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise, every step
    assert len(set(a.values())) == len(a)  # the losses really change step to step
    # The library's loader rebuilds the model from either run, or from one step folder.
    model_a, config_a = restore_model(str(straight))
    model_b = load_model(str(resumed))
    model_c = load_model(str(straight / str(2 * k)))
    assert config_a.model.d_model == 32 and config_a.train.steps == 2 * k
    leaves = [jax.tree.leaves(nnx.state(m)) for m in (model_a, model_b, model_c)]
    for x, y, z in zip(*leaves):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_array_equal(np.asarray(x), np.asarray(z))
    logits = model_a(np.zeros((1, 5), np.int32))
    assert logits.shape == (1, 5, 264) and np.all(np.isfinite(np.asarray(logits)))
    assert read_run_config(str(straight))[1] == 2 * k
    # An earlier step folder loads that step's weights, not the latest.
    model_k = load_model(str(straight / str(k)))
    k_leaf = jax.tree.leaves(nnx.state(model_k))[0]
    assert not np.array_equal(
        np.asarray(k_leaf), np.asarray(jax.tree.leaves(nnx.state(model_a))[0])
    )


def test_resume_with_state_passing_is_exact(tmp_path):
    """train.state_passing: the carried states are saved in the checkpoint (non-zero), and a
    run stopped and resumed gives bitwise the losses of one uninterrupted run."""
    k, sp = 3, {"train.state_passing": True, "checkpoint.every": 3, "train.steps": 6}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(args(tmp_path, straight, **sp))
    run_train(args(tmp_path, resumed, **sp, **{"train.stop_at": k}))
    assert complete_steps(resumed) == [k]
    run_train(args(tmp_path, resumed, **sp))
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 2 * k + 1))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise, every step
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore(str(resumed / str(k) / "train"))
    ssm = np.asarray(saved["carry"]["ssm"])
    assert ssm.shape[:2] == (2, 8) and np.abs(ssm).max() > 0  # (n_layer, rows, e, n)
    # Resuming with state passing switched off is refused in one line, the checkpoints kept.
    off = {**sp, "train.state_passing": False, "train.steps": 9}
    _, proc = run_train(args(tmp_path, resumed, **off), expect_ok=False)
    assert proc.returncode == 2 and "was trained with train.state_passing=true" in proc.stderr
    assert complete_steps(resumed) == [k, 2 * k]


def _start(cmd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", XLA_FLAGS="")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for a checkpoint")


def test_sigkill_resumes_from_last_complete_checkpoint_and_sigterm_saves(tmp_path):
    ckpt = tmp_path / "run"
    cmd = [sys.executable, "train.py"] + args(
        tmp_path, ckpt, **{"train.steps": 100000, "checkpoint.every": 2, "checkpoint.keep": 2}
    )
    proc = _start(cmd)
    _wait_for(lambda: len(complete_steps(ckpt)) >= 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    survived = complete_steps(ckpt)[-1]
    assert survived >= 4
    # Resume: it must pick the latest complete step, train on, and save on SIGTERM.
    proc = _start(cmd)
    _wait_for(lambda: complete_steps(ckpt)[-1] >= survived + 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from {ckpt} step {survived}" in out
    stopped = int(out.split("SIGTERM: saving step ")[1].split()[0])
    assert complete_steps(ckpt)[-1] == stopped > survived
    with open(os.path.join(ckpt, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    # Steps the killed run logged after its last checkpoint were dropped and trained again:
    # every step once, in order, with no gap at the resume.
    assert steps == list(range(1, stopped + 1))


@pytest.mark.parametrize("src, dst", [((1, 4, 2), (1, 2, 4))])
def test_restore_onto_another_mesh(tmp_path, src, dst):
    model = MambaConfig(d_model=32, n_layer=2, vocab_size=257, scan_impl="reference")
    tx = trainer.make_optimizer(TrainConfig(steps=10))
    mesh_a = shd.make_mesh(MeshConfig(*src))
    _, state, _ = trainer.init_state(model, tx, mesh_a, seed=3)
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "c")), with_data=False)
    ckpt.save(5, state, force=True)
    ckpt.close()
    mesh_b = shd.make_mesh(MeshConfig(*dst))
    _, abstract, shardings = trainer.train_state_shardings(model, tx, mesh_b)
    ckpt = Checkpointer(CheckpointConfig(dir=str(tmp_path / "c")), with_data=False)
    assert ckpt.latest_step() == 5
    restored = ckpt.restore(5, abstract, shardings)
    ckpt.close()
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kernel = restored["params"]["layers"]["mixer"]["in_proj"]["kernel"]  # (layers, d, 2e)
    assert kernel.sharding.mesh.shape == mesh_b.shape
    assert kernel.addressable_shards[0].data.shape == (2, 32 // dst[1], 128 // dst[2])
    mu = restored["opt_state"][1][0].mu["layers"]["mixer"]["in_proj"]["kernel"]
    assert mu.sharding.spec == kernel.sharding.spec
