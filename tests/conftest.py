"""Shared test setup: fake CPU devices, the tolerance table, the gpu marker, and helpers that run
train.py as a user does (a subprocess) on a tiny config."""

import json
import os
import pathlib
import subprocess
import sys

# Eight fake CPU devices let the sharding tests build real meshes on one machine.
# This must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The notebooks' helpers live beside the notebooks; their tests import them from there.
sys.path.insert(0, str(ROOT / "notebooks"))

jax.config.update("jax_default_matmul_precision", "highest")

# One table, per input dtype: (rtol, atol) for comparing a fast path against the fp32 reference.
# bf16/fp16 entries cover inputs rounded to 8/11 mantissa bits before the fp32 scan.
TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=2e-4, atol=2e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=3e-2, atol=3e-2),
    jnp.dtype(jnp.float16): dict(rtol=5e-3, atol=5e-3),
}
# Gradients sum over length and batch, so they accumulate more rounding than outputs.
GRAD_TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=1e-3, atol=1e-4),
    jnp.dtype(jnp.bfloat16): dict(rtol=5e-2, atol=5e-2),
    jnp.dtype(jnp.float16): dict(rtol=1e-2, atol=1e-2),
}


def tolerance(dtype, grad=False):
    table = GRAD_TOLERANCES if grad else TOLERANCES
    return table[jnp.dtype(dtype)]


def _assert_close(actual, expected, dtype=jnp.float32, grad=False, err_msg=""):
    """Compare in fp32, scaling atol by the reference's magnitude so large sums are judged fairly."""
    tol = tolerance(dtype, grad)
    a = np.asarray(jnp.asarray(actual, jnp.float32))
    e = np.asarray(jnp.asarray(expected, jnp.float32))
    assert a.shape == e.shape, f"{err_msg} shape {a.shape} != {e.shape}"
    assert np.all(np.isfinite(a)), f"{err_msg} non-finite values"
    scale = max(1.0, float(np.max(np.abs(e))) if e.size else 1.0)
    np.testing.assert_allclose(a, e, rtol=tol["rtol"], atol=tol["atol"] * scale, err_msg=err_msg)


@pytest.fixture
def assert_close():
    return _assert_close


def gpu_available() -> bool:
    try:
        return any(d.platform == "gpu" for d in jax.devices())
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; run on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------------------------
# train.py on a tiny model.


def corpus(tmp_path):
    """A few small text files (the repo's own sources), enough for train and validation."""
    directory = tmp_path / "corpus"
    directory.mkdir(exist_ok=True)
    for name in ("scan.py", "model.py", "mixer.py", "layers.py"):
        text = (ROOT / "mamba_jax" / name).read_text()
        (directory / f"{name}.txt").write_text(text)
    return str(directory)


def train_args(tmp_path, ckpt_dir, **overrides) -> list[str]:
    """train.py arguments for a 2-layer d_model 32 model on `corpus`, plus `overrides`."""
    base = {
        "data.train_path": corpus(tmp_path),
        "data.val_fraction": 0.25,
        "model.d_model": 32,
        "model.n_layer": 2,
        "model.vocab_size": 257,
        "model.scan_impl": "reference",
        "mesh.data": -1,
        "train.batch_size": 8,
        "train.seq_len": 32,
        "train.lr": 3e-3,
        "train.warmup_steps": 2,
        "train.log_every": 1,
        "train.eval_every": 1000,
        "train.eval_batches": 1,
        "train.sample_tokens": 0,
        "train.tensorboard": False,
        "train.progress": False,
        "checkpoint.dir": str(ckpt_dir),
        "checkpoint.async_save": True,
    }
    base.update(overrides)
    return ["--config", str(ROOT / "configs" / "tiny.yaml")] + [f"{k}={v}" for k, v in base.items()]


def run_train(argv, *, expect_ok=True, env=None, timeout=600):
    """Runs `python train.py argv` in a subprocess (8 fake CPU devices, like the tests).

    Returns (the run's train_summary.json or None, CompletedProcess). With expect_ok, a non-zero
    exit fails the test with train.py's stderr."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *map(str, argv)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )
    if expect_ok:
        assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    summary = None
    if "checkpoint.dir" in " ".join(map(str, argv)):
        ckpt = [a.split("=", 1)[1] for a in map(str, argv) if a.startswith("checkpoint.dir=")][-1]
        path = os.path.join(ckpt, "train_summary.json")
        if os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
    return summary, proc


def losses(ckpt_dir) -> dict:
    """{step: loss} from a run's metrics.jsonl."""
    with open(os.path.join(ckpt_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def complete_steps(ckpt_dir) -> list[int]:
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


# ----------------------------------------------------------------------------------------------
# Scan-kernel test inputs, shared by the Pallas (GPU, TPU) and Triton kernel tests.

SCAN_ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_scan_args(seed, b, length, e, n, groups, dtype, *, z=True, D=True, bias=True, h0=True,
                   softplus=True, bias_shift=0.0):  # fmt: skip
    """Random selective_scan arguments (SCAN_ARG_NAMES); groups=0 gives shared (b, l, n) B and
    C. bias_shift moves delta_bias (negative: a padded token's softplus(bias) step is visible)."""
    ks = jax.random.split(jax.random.key(seed), 9)
    delta = jax.random.normal(ks[1], (b, length, e)) * 0.7 - 1.0
    # Without softplus, delta must already be a positive step, or the state grows without bound.
    delta = delta if softplus else jax.nn.softplus(delta)
    bc_shape = (b, length, n) if groups == 0 else (b, length, groups, n)
    return dict(
        u=jax.random.normal(ks[0], (b, length, e), dtype),
        delta=delta.astype(dtype),
        A=-jnp.exp(jax.random.normal(ks[2], (e, n)) * 0.5),
        B=jax.random.normal(ks[3], bc_shape, dtype),
        C=jax.random.normal(ks[4], bc_shape, dtype),
        D=jax.random.normal(ks[5], (e,)) if D else None,
        z=jax.random.normal(ks[6], (b, length, e), dtype) if z else None,
        delta_bias=jax.random.normal(ks[7], (e,)) * 0.3 + bias_shift if bias else None,
        initial_state=jax.random.normal(ks[8], (b, e, n)) if h0 else None,
    )


def segment_ids_from_starts(length, *rows):
    """(b, l) int32 ids, one row per list of positions where a new segment starts."""
    ids = np.zeros((len(rows), length), np.int32)
    for r, starts in enumerate(rows):
        for s in starts:
            ids[r, s:] += 1
    return jnp.asarray(ids)
