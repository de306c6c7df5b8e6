"""Accuracy of a trained model on the synthetic tasks, at any length, in bounded memory.

    python benchmarks/tasks.py --task induction_heads --checkpoint runs/induction_heads \
        --num 1000 --out benchmarks/results/tasks_induction_heads.json

Sequences are fed in chunks through the model's cache (`logits, cache = model(ids, cache=cache)`
carries the conv and SSM states exactly), so memory depends on the chunk, not on the length,
and only the predictions at the scored positions (the last 16 for Selective Copying, the last one
for Induction Heads) are kept. Every evaluated sequence is fresh: examples come from an evaluation
seed that training never uses.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.model import MambaLM, with_config
from mamba_jax.training.tasks import make_task

EVAL_SEED = 1 << 21  # neither a training seed nor seed + VALIDATION_SEED_OFFSET
DEFAULT_LENGTHS = {
    "selective_copying": [4096],
    "induction_heads": [2**k for k in range(6, 21)],
}


class TailPredictor:
    """Runs (b, l) token ids through the model chunk by chunk and returns the argmax predictions
    at the last `tail` positions, (b, tail) int32. Compiles once per chunk length."""

    def __init__(self, model: MambaLM, vocab_size: int):
        self.graphdef, self.state = nnx.split(model)
        self.model = model
        self.vocab_size = vocab_size
        self._step = jax.jit(self._chunk, static_argnames="tail")

    def _chunk(self, state, cache, ids, tail):
        model = nnx.merge(self.graphdef, state)
        logits, cache = model(ids, cache=cache)  # (b, c, v_pad)
        # Padded vocab entries are never valid answers.
        preds = jnp.argmax(logits[:, -tail:, : self.vocab_size], axis=-1).astype(jnp.int32)
        return cache, preds  # (b, tail)

    def __call__(self, ids: np.ndarray, tail: int, chunk: int) -> np.ndarray:
        b, l = ids.shape
        if not 1 <= tail <= l:
            raise ValueError(f"tail must be in [1, l={l}], got {tail}")
        cache = self.model.init_cache(b)
        preds = np.zeros((b, 0), np.int32)
        for start in range(0, l, chunk):
            piece = jnp.asarray(ids[:, start : start + chunk], jnp.int32)
            k = min(tail, piece.shape[1])
            cache, p = self._step(self.state, cache, piece, tail=k)
            preds = np.concatenate([preds, np.asarray(p)], axis=1)[:, -tail:]
        return preds


def pick_chunk(length: int, batch: int, chunk_tokens: int) -> int:
    """The largest power-of-two chunk with batch * chunk <= chunk_tokens (at least 16), capped at l."""
    chunk = 16
    while chunk * 2 * batch <= chunk_tokens:
        chunk *= 2
    return min(chunk, length)


def fastest_scan_impl(model: MambaLM, batch: int, chunk: int, candidates=None) -> str:
    """Times one chunk's forward with each scan implementation that runs here and returns the
    fastest whose predictions agree with the sequential reference's."""
    candidates = candidates or ("reference", "associative", "pallas")
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, chunk))
    tail = min(16, chunk)
    times, preds = {}, {}
    for impl in candidates:
        try:
            predictor = TailPredictor(with_config(model, scan_impl=impl), model.config.vocab_size)
            predictor(ids, tail, chunk)  # compile
            t0 = time.perf_counter()
            preds[impl] = predictor(ids, tail, chunk)
            times[impl] = time.perf_counter() - t0
        except Exception as err:  # an impl that does not run here is simply not a candidate
            print(f"scan impl {impl!r} unavailable: {type(err).__name__}: {err}"[:300])
    if "reference" in preds:
        for impl in list(times):
            agree = float(np.mean(preds[impl] == preds["reference"]))
            if agree < 0.99:  # argmax may flip on near-ties, never on many positions
                print(f"scan impl {impl!r} disagrees with the reference ({agree:.3f}); skipped")
                del times[impl]
    if not times:
        raise RuntimeError("no scan implementation ran")
    print("chunk forward seconds by scan impl:", {k: round(v, 4) for k, v in times.items()})
    return min(times, key=times.get)


def _tail_batch(task, seed: int, start: int, count: int):
    """inputs (count, l) int32 and the answers at the scored positions (count, tail), keeping
    only the tail of targets and mask (at l = 2^20 the full arrays would triple host memory)."""
    inputs, answers, tail = np.empty((count, task.seq_len), np.int32), [], None
    for row in range(count):
        ex = task.example(seed, start + row)
        scored = int(ex["mask"].sum())
        tail = scored if tail is None else tail
        # Both tasks score only the last positions; check it rather than assume it.
        if scored != tail or not np.all(ex["mask"][-tail:] == 1):
            raise ValueError(f"{task.name}: the scored positions are not the last {tail}")
        inputs[row] = ex["inputs"]
        answers.append(ex["targets"][-tail:])
    return inputs, np.stack(answers)


def task_accuracy(
    model: MambaLM,
    task,
    length: int | None = None,
    num: int = 1000,
    *,
    batch: int = 1000,
    chunk_tokens: int = 2**21,
    batch_tokens: int = 2**25,
    seed: int = EVAL_SEED,
    predictor: TailPredictor | None = None,
    progress: bool = True,
) -> dict:
    """Accuracy over `num` fresh sequences: the fraction of scored tokens predicted right (16 per
    sequence for Selective Copying, 1 for Induction Heads). `task` is a task object from
    mamba_jax.training.tasks, or a task name together with `length`.

    Memory is bounded at every length: a batch holds at most max(1, batch_tokens // length)
    sequences on the host, and the device sees chunk_tokens tokens at a time."""
    from tqdm.auto import tqdm

    if isinstance(task, str):
        if length is None:
            raise ValueError(f"task_accuracy({task!r}, ...) needs a length")
        task = make_task(task, length, model.config.vocab_size)
    task_name, length = task.name, task.seq_len
    if num < 1 or batch < 1:
        raise ValueError(f"num and batch must be >= 1, got num={num} batch={batch}")
    batch = min(batch, max(1, batch_tokens // length))
    predictor = predictor or TailPredictor(model, task.vocab_size)
    correct = total = 0
    t0 = time.perf_counter()
    with tqdm(total=num, desc=f"{task_name} l={length}", disable=not progress, leave=False) as bar:
        for start in range(0, num, batch):
            count = min(batch, num - start)
            inputs, answers = _tail_batch(task, seed, start, count)
            tail = answers.shape[1]
            chunk = pick_chunk(length, count, chunk_tokens)
            preds = predictor(inputs, tail, chunk)
            correct += int(np.sum(preds == answers))
            total += preds.size
            bar.update(count)
    return {
        "length": length,
        "num_sequences": num,
        "scored_tokens": total,
        "accuracy": correct / total,
        "chance": task.chance,
        "seconds": round(time.perf_counter() - t0, 2),
    }
