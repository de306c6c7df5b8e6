"""The paper's synthetic tasks (section 4.1, appendix E.1): Selective Copying and Induction Heads.

Every example is a pure function of (seed, index), so a Grain pipeline over example indices is
random-access, reproducible on any number of processes, and its iterator state (one integer)
checkpoints beside the model. Each example is a dict:

    inputs   (l,) int32    the token sequence fed to the model
    targets  (l,) int32    what the model must output at each position (0 where it is not scored)
    mask     (l,) float32  1 where the loss and the accuracy count

Selective Copying (paper Figure 2, right): `n_data` data tokens sit at random positions among
noise tokens; after them come `n_data` marker tokens, and at the k-th marker the model must output
the k-th data token. Token ids: 0 noise, 1 .. v - 2 data, v - 1 marker. Unlike plain Copying,
the gaps between data tokens vary, so a time-invariant (LTI) layer cannot solve it by a fixed
delay: it needs to decide per token what to keep (the paper's motivation for selection).

Induction Heads: a trigger token (id v - 1, never used as noise) appears once in the first half
of the sequence, followed by a target token; the last token is the trigger again, and the model
must output the target there. Noise and targets are drawn from 0 .. v - 2.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TASKS = ("selective_copying", "induction_heads")

# Validation examples (during training) use seed + this offset; eval_tasks uses another seed still.
VALIDATION_SEED_OFFSET = 1 << 20
# Distinguishes the two tasks' random streams for the same (seed, index).
_STREAM = {"selective_copying": 1, "induction_heads": 2}


def _rng(task: str, seed: int, index: int) -> np.random.Generator:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed} index={index}")
    return np.random.default_rng((_STREAM[task], int(seed), int(index)))


def _empty(length: int):
    return (
        np.zeros((length,), np.int32),
        np.zeros((length,), np.int32),
        np.zeros((length,), np.float32),
    )


@dataclasses.dataclass(frozen=True)
class SelectiveCopying:
    """seq_len l (markers included), vocab v (noise + data + marker), n_data tokens to copy."""

    seq_len: int = 4096
    vocab_size: int = 16
    n_data: int = 16
    name = "selective_copying"

    def __post_init__(self):
        if self.vocab_size < 3:
            raise ValueError(
                f"vocab_size must be >= 3 (noise, data, marker), got {self.vocab_size}"
            )
        if self.n_data < 1:
            raise ValueError(f"n_data must be >= 1, got {self.n_data}")
        if self.seq_len < 2 * self.n_data:
            raise ValueError(
                f"seq_len must be >= 2 * n_data = {2 * self.n_data}, got {self.seq_len}"
            )

    @property
    def noise(self) -> int:
        return 0

    @property
    def marker(self) -> int:
        return self.vocab_size - 1

    @property
    def chance(self) -> float:
        """Accuracy of guessing a data token uniformly."""
        return 1.0 / (self.vocab_size - 2)

    def example(self, seed: int, index: int) -> dict[str, np.ndarray]:
        l, k = self.seq_len, self.n_data
        rng = _rng(self.name, seed, index)
        data = rng.integers(1, self.vocab_size - 1, size=k, dtype=np.int32)  # (k,)
        slots = np.sort(rng.choice(l - k, size=k, replace=False))  # (k,) in the noise region
        inputs, targets, mask = _empty(l)
        inputs[slots] = data
        inputs[l - k :] = self.marker
        targets[l - k :] = data
        mask[l - k :] = 1.0
        return {"inputs": inputs, "targets": targets, "mask": mask}


@dataclasses.dataclass(frozen=True)
class InductionHeads:
    """seq_len l, vocab v (v - 1 noise/target tokens + the trigger)."""

    seq_len: int = 256
    vocab_size: int = 16
    name = "induction_heads"

    def __post_init__(self):
        if self.vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3, got {self.vocab_size}")
        if self.seq_len < 4:
            raise ValueError(f"seq_len must be >= 4, got {self.seq_len}")

    @property
    def trigger(self) -> int:
        return self.vocab_size - 1

    @property
    def chance(self) -> float:
        return 1.0 / (self.vocab_size - 1)

    def example(self, seed: int, index: int) -> dict[str, np.ndarray]:
        l = self.seq_len
        rng = _rng(self.name, seed, index)
        inputs, targets, mask = _empty(l)
        # uint8 draws are twice as fast as int32 ones, which matters at l = 2^20.
        inputs[:] = rng.integers(0, self.trigger, size=l, dtype=np.uint8)
        # First trigger in the first half, so the recall distance grows with the length.
        first = int(rng.integers(0, l // 2))
        inputs[first] = self.trigger
        inputs[l - 1] = self.trigger
        targets[l - 1] = inputs[first + 1]
        mask[l - 1] = 1.0
        return {"inputs": inputs, "targets": targets, "mask": mask}


def make_task(name: str, seq_len: int, vocab_size: int = 16):
    """The task object for `name` (one of TASKS) at this length and vocabulary."""
    if name == "selective_copying":
        return SelectiveCopying(seq_len=seq_len, vocab_size=vocab_size)
    if name == "induction_heads":
        return InductionHeads(seq_len=seq_len, vocab_size=vocab_size)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")


class TaskSource:
    """A Grain random-access source: record i is `task.example(seed, i)`, made on demand."""

    def __init__(self, task, seed: int, num_records: int = 2**40):
        if num_records < 1:
            raise ValueError(f"num_records must be >= 1, got {num_records}")
        self.task, self.seed, self.num_records = task, int(seed), int(num_records)

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range [0, {self.num_records})")
        return self.task.example(self.seed, index)

    def __repr__(self) -> str:
        return f"TaskSource({self.task!r}, seed={self.seed}, num_records={self.num_records})"


def task_dataset(
    task,
    *,
    seed: int,
    batch_size: int,
    shard_index: int = 0,
    shard_count: int = 1,
    num_records: int = 2**40,
    read_options=None,
):
    """Batches of fresh examples as a Grain IterDataset, whose iterator state checkpoints.

    Each process reads records shard_index, shard_index + shard_count, ..., so the processes of
    a multi-host run see disjoint examples, and batch j of process p is the same on every run.
    Yields dicts of inputs (b, l) int32, targets (b, l) int32, mask (b, l) float32."""
    import grain

    if not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got {shard_index}, {shard_count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = grain.MapDataset.source(TaskSource(task, seed, num_records))
    ds = ds[shard_index::shard_count].batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(read_options)


def task_batch(task, seed: int, start: int, count: int) -> dict[str, np.ndarray]:
    """Examples start .. start + count - 1 stacked: inputs/targets (count, l) int32, mask float32."""
    examples = [task.example(seed, i) for i in range(start, start + count)]
    return {k: np.stack([ex[k] for ex in examples]) for k in ("inputs", "targets", "mask")}


# ----------------------------------------------------------------------------------------------
# What train.py uses when `data.task` is set.


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size={global_batch} must be a multiple of the process count "
            f"{process_count}"
        )
    return global_batch // process_count


def task_train_dataset(
    name: str,
    seq_len: int,
    vocab_size: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
):
    """Endless batches of fresh examples for this process (global_batch / process_count rows)."""
    import grain

    return task_dataset(
        make_task(name, seq_len, vocab_size),
        seed=seed,
        batch_size=_local_batch(global_batch, process_count),
        shard_index=process_index,
        shard_count=process_count,
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=4),
    )


def task_eval_batches(
    name: str,
    seq_len: int,
    vocab_size: int,
    global_batch: int,
    n_batches: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """A fixed validation set for this process, from a seed stream training never reads."""
    task, local = make_task(name, seq_len, vocab_size), _local_batch(global_batch, process_count)
    return [
        task_batch(
            task, seed + VALIDATION_SEED_OFFSET, b * global_batch + process_index * local, local
        )
        for b in range(n_batches)
    ]
