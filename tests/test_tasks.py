"""The synthetic tasks: generator structure, determinism, the Grain pipeline and its checkpointable
state, chunked evaluation against a full forward, and a toy-scale training smoke test."""

import numpy as np
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLM, with_config
from mamba_jax.training.eval_tasks import (
    TailPredictor,
    fastest_scan_impl,
    pick_chunk,
    task_accuracy,
)
from mamba_jax.training.tasks import (
    InductionHeads,
    SelectiveCopying,
    TaskSource,
    make_task,
    task_batch,
    task_dataset,
)
from tests.conftest import ROOT


@pytest.mark.parametrize("seq_len", [32, 257, 4096])
@pytest.mark.parametrize("n_data", [1, 16])
def test_selective_copying_structure(seq_len, n_data):
    task = SelectiveCopying(seq_len=seq_len, vocab_size=16, n_data=n_data)
    for index in range(20):
        ex = task.example(seed=3, index=index)
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        assert x.shape == y.shape == m.shape == (seq_len,)
        assert (x.dtype, y.dtype, m.dtype) == (np.int32, np.int32, np.float32)
        body, tail = x[: seq_len - n_data], x[seq_len - n_data :]
        assert np.all(tail == task.marker)
        data = body[body != task.noise]
        # Exactly n_data data tokens in the body, all from the data range, none of them markers.
        assert len(data) == n_data
        assert np.all((data >= 1) & (data <= 14))
        # The answer is the data tokens in their order of appearance, at the marker positions.
        np.testing.assert_array_equal(y[seq_len - n_data :], data)
        np.testing.assert_array_equal(
            m, (np.arange(seq_len) >= seq_len - n_data).astype(np.float32)
        )
        assert np.all(y[: seq_len - n_data] == 0)


def test_selective_copying_positions_vary():
    """Selection is needed because the gaps vary: positions must differ between examples and
    cover the whole noise region."""
    task = SelectiveCopying(seq_len=128, n_data=4)
    positions = [np.flatnonzero(task.example(0, i)["inputs"][:124]) for i in range(200)]
    assert len({tuple(p) for p in positions}) > 190
    allpos = np.concatenate(positions)
    assert allpos.min() < 5 and allpos.max() > 118


@pytest.mark.parametrize("seq_len", [4, 5, 64, 1000])
def test_induction_heads_structure(seq_len):
    task = InductionHeads(seq_len=seq_len, vocab_size=16)
    for index in range(30):
        ex = task.example(seed=1, index=index)
        x, y, m = ex["inputs"], ex["targets"], ex["mask"]
        assert x.shape == y.shape == m.shape == (seq_len,)
        triggers = np.flatnonzero(x == task.trigger)
        # The trigger appears exactly twice: once in the first half, and as the last token.
        assert len(triggers) == 2 and triggers[-1] == seq_len - 1
        first = triggers[0]
        assert first < seq_len // 2
        assert y[-1] == x[first + 1] != task.trigger
        assert m[-1] == 1 and m.sum() == 1 and np.all(y[:-1] == 0)
        assert x.min() >= 0 and x.max() <= task.trigger


def test_first_trigger_spread():
    task = InductionHeads(seq_len=64)
    firsts = [np.flatnonzero(task.example(0, i)["inputs"] == 15)[0] for i in range(300)]
    assert min(firsts) == 0 and max(firsts) == 31
    targets = {int(task.example(0, i)["targets"][-1]) for i in range(300)}
    assert targets == set(range(15))


@pytest.mark.parametrize("name", ["selective_copying", "induction_heads"])
def test_deterministic_from_seed_and_index(name):
    task = make_task(name, 64)
    a, b = task.example(5, 17), task.example(5, 17)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    others = [task.example(6, 17)["inputs"], task.example(5, 18)["inputs"]]
    assert all(not np.array_equal(a["inputs"], o) for o in others)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task must be one of"):
        make_task("copying", 64)
    with pytest.raises(ValueError, match="seq_len"):
        SelectiveCopying(seq_len=20, n_data=16)
    with pytest.raises(ValueError, match="vocab_size"):
        InductionHeads(vocab_size=2)
    with pytest.raises(ValueError, match="seed and index"):
        InductionHeads().example(-1, 0)
    with pytest.raises(IndexError):
        TaskSource(InductionHeads(), 0, num_records=4)[4]


def test_grain_pipeline_batches_shards_and_resumes():
    task = make_task("induction_heads", 32)
    it = iter(task_dataset(task, seed=2, batch_size=4))
    first = next(it)
    assert first["inputs"].shape == (4, 32) and first["mask"].dtype == np.float32
    expected = task_batch(task, 2, 0, 4)
    for key in expected:
        np.testing.assert_array_equal(first[key], expected[key])
    # The iterator state checkpoints: restoring it replays the same next batch.
    state = it.get_state()
    second = next(it)
    it2 = iter(task_dataset(task, seed=2, batch_size=4))
    it2.set_state(state)
    np.testing.assert_array_equal(next(it2)["inputs"], second["inputs"])
    np.testing.assert_array_equal(second["inputs"], task_batch(task, 2, 4, 4)["inputs"])
    # Two processes read disjoint, interleaved records of one global order.
    p0 = next(iter(task_dataset(task, seed=2, batch_size=2, shard_index=0, shard_count=2)))
    p1 = next(iter(task_dataset(task, seed=2, batch_size=2, shard_index=1, shard_count=2)))
    np.testing.assert_array_equal(p0["inputs"], expected["inputs"][[0, 2]])
    np.testing.assert_array_equal(p1["inputs"], expected["inputs"][[1, 3]])


@pytest.mark.parametrize("impl", ["reference", "associative"])
def test_chunked_tail_predictions_match_full_forward(impl):
    config = MambaConfig(d_model=8, n_layer=2, vocab_size=16, scan_impl="reference")
    model = MambaLM(config, rngs=nnx.Rngs(0))
    ids = np.random.default_rng(1).integers(0, 16, (3, 45))
    logits = np.asarray(model(ids))  # (b, l, v)
    full = logits[..., :16].argmax(-1)
    predictor = TailPredictor(with_config(model, scan_impl=impl), vocab_size=16)
    for chunk in (4, 45):  # chunks that split the tail with a ragged last chunk; one chunk
        np.testing.assert_array_equal(predictor(ids, 7, chunk), full[:, -7:])


def test_fastest_scan_impl_picks_one_that_runs_and_agrees():
    config = MambaConfig(d_model=8, n_layer=1, vocab_size=16, scan_impl="reference")
    model = MambaLM(config, rngs=nnx.Rngs(0))
    # "pallas" cannot run on CPU and "nonexistent" is no impl at all: both are left out.
    impl = fastest_scan_impl(model, 2, 16, candidates=("reference", "associative", "nonexistent"))
    assert impl in ("reference", "associative")


def test_task_accuracy_bounds_the_host_batch_without_changing_the_result():
    from mamba_jax.training.eval_tasks import _tail_batch

    task = SelectiveCopying(seq_len=40, vocab_size=16, n_data=4)
    inputs, answers = _tail_batch(task, 7, 3, 5)
    full = task_batch(task, 7, 3, 5)
    np.testing.assert_array_equal(inputs, full["inputs"])
    np.testing.assert_array_equal(answers, full["targets"][:, -4:])
    model = MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=16, scan_impl="reference"),
                    rngs=nnx.Rngs(0))  # fmt: skip
    whole = task_accuracy(model, task, num=24, batch=24, progress=False)
    # 40 tokens per sequence and a 100-token bound: batches of 2 sequences, chunks of 16 tokens
    bounded = task_accuracy(model, task, num=24, batch=24, batch_tokens=100, chunk_tokens=32,
                       progress=False)  # fmt: skip
    assert whole["scored_tokens"] == bounded["scored_tokens"] == 24 * 4
    assert whole["accuracy"] == bounded["accuracy"]


def test_pick_chunk_bounds_memory():
    assert pick_chunk(2**20, 1000, 2**21) == 2048
    assert pick_chunk(64, 1000, 2**21) == 64
    assert pick_chunk(2**20, 10**6, 2**21) == 16


# ----------------------------------------------------------------------------------------------
# Toy-scale training through the project's training loop: a smoke test that the tasks, the masked
# loss and the evaluation fit together, not a reproduction (see the README for that).


def test_induction_heads_trains_through_train_py(tmp_path):
    """train.py with data.task, then restore_model and eval_tasks on fresh sequences."""
    from mamba_jax.training.checkpoint import restore_model
    from tests.conftest import run_train

    out, _ = run_train([
        "--config", str(ROOT / "configs" / "induction_heads.yaml"), f"checkpoint.dir={tmp_path}",
        "model.d_model=32", "model.scan_impl=reference", "train.seq_len=16",
        "train.batch_size=32", "train.steps=250", "train.lr=0.01", "train.min_lr=0.01",
        "train.warmup_steps=0", "train.log_every=50", "train.eval_every=250",
        "train.eval_batches=1", "train.progress=false",
        "checkpoint.every=250", "checkpoint.async_save=false",
    ])  # fmt: skip
    assert out["step"] == 250 and out["loss"] < 1.0 and out["eval_accuracy"] > 0.6, out
    model, config = restore_model(str(tmp_path))
    assert config.model.vocab_size == 16 and config.model.d_model == 32 and config.data.task
    row = task_accuracy(model, "induction_heads", 16, num=200, batch=200, progress=False)
    assert row["accuracy"] > 0.6, row  # chance is 1/15


def test_selective_copying_trains_with_the_train_step():
    """The trainer's sharded train step on dict batches with a mask, at toy size (4 tokens to
    copy among 20 positions, vocab 8), then accuracy on fresh sequences."""
    import jax

    from mamba_jax import sharding as shd
    from mamba_jax.config import MeshConfig
    from mamba_jax.training import trainer
    from mamba_jax.training.run_config import TrainConfig

    task = SelectiveCopying(seq_len=24, vocab_size=8, n_data=4)
    model_config = MambaConfig(d_model=32, n_layer=2, vocab_size=8, scan_impl="reference")
    tc = TrainConfig(steps=400, batch_size=32, seq_len=24, lr=1e-2, min_lr=1e-2, warmup_steps=0,
                     weight_decay=0.0)  # fmt: skip
    mesh = shd.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    tx = trainer.make_optimizer(tc)
    graphdef, state, shardings = trainer.init_state(model_config, tx, mesh, seed=0)
    train_step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    batches = iter(task_dataset(task, seed=0, batch_size=32))
    for _ in range(tc.steps):
        state, metrics = train_step(state, trainer.global_batch(next(batches), mesh))
    model = nnx.merge(graphdef, state["params"])
    row = task_accuracy(model, task, num=200, batch=200, progress=False)
    assert row["scored_tokens"] == 200 * 4 and row["chance"] == pytest.approx(1 / 6)
    assert row["accuracy"] > 3 * task.chance, row
