"""Training data: files -> tokens -> packed windows -> Grain pipeline, split across processes.

Text corpora (files, globs, directories) are tokenized once into one flat stream, with the
tokenizer's eos between documents, and cut into windows of `seq_len + 1` tokens (inputs and
next-token targets); documents run across window edges (packing without padding). Token files
(`.bin`, a flat uint16/uint32 array as nanoGPT writes them) are memory-mapped instead, so corpora
larger than host memory work.

With train.state_passing the windows are not shuffled: each batch row streams its own contiguous
lane of the corpus (StreamWindows), so the states a step ends with can start the next.

Order is deterministic: window indices are shuffled by Grain from `data.seed` (a new permutation
every epoch), and process p of P reads elements p, p + P, ... of that order, so the global batch
is the same whatever the process count. The iterator state (a position in that order) is what
the checkpoint saves.

The default corpus is the running Python's standard library (`.py` files), split into training
and validation by file.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig

import grain
import numpy as np

from mamba_jax import sharding as shd
from mamba_jax.tokenizer import load_tokenizer
from mamba_jax.training.run_config import Config, DataConfig
from mamba_jax.training.tasks import task_eval_batches, task_train_dataset

TOKEN_SUFFIXES = (".bin",)


def stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    return [f for f in files if "site-packages" not in f and "dist-packages" not in f]


def resolve_files(spec: str, key: str = "data.train_path") -> list[str]:
    """Comma-separated files, globs or directories (searched recursively) -> sorted file list."""
    files = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if os.path.isdir(part):
            found = glob.glob(os.path.join(part, "**", "*"), recursive=True)
        else:
            found = glob.glob(os.path.expanduser(part), recursive=True)
        files.extend(f for f in found if os.path.isfile(f))
    if not files:
        raise ValueError(f"{key}={spec!r} matched no files (expected files, globs or directories)")
    return sorted(set(files))


def split_by_file(files: list[str], val_fraction: float, seed: int):
    """Deterministic train/validation split of a file list (at least one file in each)."""
    if len(files) < 2:
        raise ValueError(
            f"splitting a validation set by file needs >= 2 files, got {len(files)}; "
            "set data.val_path or give more files"
        )
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = min(len(files) - 1, max(1, round(val_fraction * len(files))))
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val


def tokenize_files(files: list[str], tokenizer, dtype=np.uint32) -> tuple[np.ndarray, int]:
    """Returns (tokens (t,), number of source bytes); each document ends with eos."""
    pieces, n_bytes = [], 0
    eos = np.asarray([tokenizer.eos_id], dtype)
    byte_level = getattr(tokenizer, "vocab_size", None) == 257 and tokenizer.eos_id == 256
    for path in files:
        with open(path, "rb") as f:
            raw = f.read()
        if not raw:
            continue
        n_bytes += len(raw)
        if byte_level:  # UTF-8 bytes are the tokens; no decode/encode round trip needed
            ids = np.frombuffer(raw, np.uint8).astype(dtype)
        else:
            ids = np.asarray(tokenizer.encode(raw.decode("utf-8", errors="replace")), dtype)
        pieces.extend([ids, eos])
    if not pieces:
        raise ValueError(f"the corpus is empty: {len(files)} file(s), all of them empty")
    return np.concatenate(pieces), n_bytes


class TokenWindows:
    """Window i is tokens[i * l : i * l + l + 1], as inputs (l,) and next-token targets (l,).

    With `eos_id` given, each window also carries segment_ids (l,) int32: a new segment starts
    at every end-of-text token, which thus opens the next document (as a beginning-of-text
    token would), while the last token of a document still learns to predict end-of-text. The
    first segment of a window may be the middle of a document."""

    def __init__(self, tokens: np.ndarray, seq_len: int, eos_id: int | None = None):
        self.tokens, self.seq_len, self.eos_id = tokens, seq_len, eos_id
        self.n = (len(tokens) - 1) // seq_len

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = int(i) * self.seq_len
        window = np.asarray(self.tokens[start : start + self.seq_len + 1], np.int32)
        out = {"inputs": window[:-1], "targets": window[1:]}
        if self.eos_id is not None:
            out["segment_ids"] = np.cumsum(out["inputs"] == self.eos_id, dtype=np.int32)
        return out


class StreamWindows:
    """The corpus as `rows` parallel streams for state passing: lane r is the contiguous slice
    tokens[r * lane : (r + 1) * lane + 1], cut into windows of `seq_len`; element i is window
    i // rows of lane i % rows, so consecutive batches of `rows` elements hold consecutive
    windows of every lane, each lane always in the same batch row.

    Fields as TokenWindows', plus `carry` (l,) float32, the same value at every position (a
    per-token field shards over the mesh like the others): 1.0 where the window continues the
    previous one's document (its states carry over), 0.0 at a lane's first window and where the
    window opens with an end-of-text token (a new document; only with `eos_id`)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, rows: int, eos_id: int | None = None):
        self.tokens, self.seq_len, self.rows, self.eos_id = tokens, seq_len, rows, eos_id
        self.lane = (len(tokens) - 1) // rows
        self.windows_per_lane = self.lane // seq_len
        if self.windows_per_lane < 1:
            raise ValueError(
                f"train.state_passing splits the {len(tokens)} training tokens into "
                f"train.batch_size={rows} lanes of {self.lane} tokens, shorter than "
                f"train.seq_len={seq_len}: give more data, a smaller batch or a shorter seq_len"
            )

    def __len__(self):
        return self.windows_per_lane * self.rows

    def __getitem__(self, i):
        k, r = divmod(int(i), self.rows)
        start = r * self.lane + k * self.seq_len
        window = np.asarray(self.tokens[start : start + self.seq_len + 1], np.int32)
        out = {"inputs": window[:-1], "targets": window[1:]}
        continues = k > 0
        if self.eos_id is not None:
            out["segment_ids"] = np.cumsum(out["inputs"] == self.eos_id, dtype=np.int32)
            continues = continues and out["inputs"][0] != self.eos_id
        out["carry"] = np.full(self.seq_len, continues, np.float32)
        return out


@dataclasses.dataclass
class Corpus:
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    tokenizer: object
    bytes_per_token: float | None  # for bits per byte; None when unknown (token files)


def _is_token_file(config: DataConfig, path: str) -> bool:
    if config.format != "auto":
        return config.format == "tokens"
    return path.endswith(TOKEN_SUFFIXES)


def load_corpus(config: DataConfig, vocab_size: int | None = None) -> Corpus:
    """Reads and tokenizes (or memory-maps) the training and validation data."""
    tokenizer = load_tokenizer(config.tokenizer)
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); set model.vocab_size >= {tokenizer.vocab_size}"
        )
    if config.train_path is None:
        files = stdlib_files()
        if not files:
            raise ValueError("no standard-library .py files found; set data.train_path")
    else:
        files = resolve_files(config.train_path)
    if config.max_files is not None:
        files = files[: config.max_files]

    if _is_token_file(config, files[0]):
        train = _memmap_tokens(files, config.token_dtype)
        if config.val_path is not None:
            val = _memmap_tokens(
                resolve_files(config.val_path, "data.val_path"), config.token_dtype
            )
        else:  # the tail of the stream
            cut = int(len(train) * (1.0 - config.val_fraction))
            train, val = train[:cut], train[cut:]
        return Corpus(train, val, tokenizer, None)

    if config.val_path is not None:
        train_files, val_files = files, resolve_files(config.val_path, "data.val_path")
    else:
        train_files, val_files = split_by_file(files, config.val_fraction, config.seed)
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    train, _ = tokenize_files(train_files, tokenizer, dtype)
    val, val_bytes = tokenize_files(val_files, tokenizer, dtype)
    return Corpus(train, val, tokenizer, val_bytes / len(val))


def _memmap_tokens(files: list[str], dtype: str) -> np.ndarray:
    arrays = [np.memmap(f, dtype=np.dtype(dtype), mode="r") for f in files]
    arrays = [a for a in arrays if len(a)]
    if not arrays:
        raise ValueError(f"the token file(s) {files} are empty")
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _check_length(tokens, seq_len, what):
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"the {what} split has {len(tokens)} tokens, fewer than train.seq_len + 1 = "
            f"{seq_len + 1}; give more data or a shorter seq_len"
        )


def train_dataset(
    tokens,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    eos_id: int | None = None,
) -> grain.IterDataset:
    """Endless shuffled batches for this process: inputs, targets (global_batch / P, l) int32,
    and segment_ids when `eos_id` is given (see TokenWindows)."""
    _check_length(tokens, seq_len, "training")
    _check_processes(global_batch, process_count)
    ds = grain.MapDataset.source(TokenWindows(tokens, seq_len, eos_id))
    return _process_batches(ds.shuffle(seed=seed), global_batch, process_index, process_count)


def _check_processes(global_batch: int, process_count: int):
    if global_batch % process_count:
        raise ValueError(
            f"train.batch_size={global_batch} must be a multiple of the process count "
            f"{process_count}"
        )


def _process_batches(ds, global_batch, process_index, process_count) -> grain.IterDataset:
    """An endless repeat of `ds`: process p takes elements p, p + P, ... in batches of
    global_batch / P, so the global batch is the same whatever the process count."""
    ds = ds.repeat(None)[process_index::process_count]
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


def stream_dataset(
    tokens,
    seq_len: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    eos_id: int | None = None,
) -> grain.IterDataset:
    """Endless batches for state passing (see StreamWindows), in corpus order, no shuffling:
    batch k holds window k of every lane; after the last window every lane starts over."""
    _check_processes(global_batch, process_count)
    ds = grain.MapDataset.source(StreamWindows(tokens, seq_len, global_batch, eos_id))
    return _process_batches(ds, global_batch, process_index, process_count)


def eval_batches(
    tokens,
    seq_len: int,
    global_batch: int,
    n_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    eos_id: int | None = None,
) -> list[dict]:
    """A fixed list of validation batches for this process; windows wrap when the split is short."""
    _check_length(tokens, seq_len, "validation")
    windows = TokenWindows(tokens, seq_len, eos_id)
    local = global_batch // process_count
    out = []
    for b in range(n_batches):
        idx = [(b * global_batch + process_index * local + j) % len(windows) for j in range(local)]
        rows = [windows[i] for i in idx]
        out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
    return out


def build_data(config: Config, pid: int, nproc: int, log=print):
    """(training iterator, validation batches, tokenizer or None, bytes per token or None)."""
    tc, dc = config.train, config.data
    if dc.task is not None:
        vocab = config.model.vocab_size
        train = task_train_dataset(dc.task, tc.seq_len, vocab, tc.batch_size, dc.seed, pid, nproc)
        val = task_eval_batches(
            dc.task, tc.seq_len, vocab, tc.batch_size, tc.eval_batches, dc.seed, pid, nproc
        )
        log(f"data: synthetic task {dc.task}, length {tc.seq_len}")
        return iter(train), val, None, None
    corpus = load_corpus(dc, config.model.vocab_size)
    eos = corpus.tokenizer.eos_id if dc.packing == "reset" else None
    if tc.state_passing:
        train = stream_dataset(corpus.train_tokens, tc.seq_len, tc.batch_size, pid, nproc, eos)
    else:
        train = train_dataset(
            corpus.train_tokens, tc.seq_len, tc.batch_size, dc.seed, pid, nproc, eos_id=eos
        )
    val = eval_batches(
        corpus.val_tokens, tc.seq_len, tc.batch_size, tc.eval_batches, pid, nproc, eos_id=eos
    )
    log(
        f"data: {len(corpus.train_tokens):,} training / {len(corpus.val_tokens):,} validation "
        f"tokens, vocab {corpus.tokenizer.vocab_size}"
    )
    return iter(train), val, corpus.tokenizer, corpus.bytes_per_token


def check_batch(config: Config, mesh):
    """The micro-batch must split evenly over the data x fsdp devices, and the length over the
    sequence devices, which must sit in one process (it reads whole rows)."""
    train, shards = config.train, shd.batch_divisor(mesh)
    micro = train.batch_size // train.grad_accum
    if micro % shards:
        raise ValueError(
            f"train.batch_size / train.grad_accum = {micro} must be a multiple of the data x fsdp "
            f"mesh size {shards} (mesh {dict(mesh.shape)})"
        )
    length = shd.length_divisor(mesh)
    if train.seq_len % length:
        raise ValueError(
            f"train.seq_len={train.seq_len} must be a multiple of the sequence mesh size {length} "
            f"(mesh {dict(mesh.shape)})"
        )
    if length > 1 and not shd.sequence_within_processes(mesh):
        raise ValueError(
            f"mesh.sequence={length} spans several processes, but each process reads whole rows "
            f"of its own: make mesh.sequence at most the devices of one process"
        )
