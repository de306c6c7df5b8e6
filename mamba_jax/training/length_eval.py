"""`python -m mamba_jax.training.length_eval RUN_DIR`: does a trained model extrapolate in length?

Reads held-out documents (the run's own validation split), runs the model over each document from
its first token up to --max-len tokens (default 8x the run's train.seq_len), and reports the mean
next-token loss by position bucket: positions 0-63, 64-127, ... (powers of two). A model that
generalises past its training length keeps the loss flat (or falling: more context) beyond
train.seq_len; one that does not sees it rise there.

Documents shorter than --max-len count in the buckets they reach (rows are right-padded with a
padding mask, which leaves the states unchanged); each bucket's row says how many tokens it
averages. The table prints, and --json / --plot write it out; several runs (for example with and
without train.state_passing) share one plot.

    python -m mamba_jax.training.length_eval runs/tiny --max-len 1024 --plot runs/tiny/length.png
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

CHUNK = 1024  # positions whose (b, chunk, v) float32 logits exist at once


def documents(tokens: np.ndarray, eos_id: int, max_len: int) -> list[np.ndarray]:
    """The held-out stream -> its documents, each its tokens and the eos that ends it (the
    target of the last position), cut to max_len + 1 tokens (max_len scored positions)."""
    ends = np.flatnonzero(np.asarray(tokens) == eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, np.int64)
    docs = [np.asarray(tokens[s : min(e + 1, s + max_len + 1)]) for s, e in zip(starts, ends)]
    return [d for d in docs if len(d) >= 2]


def bucket_edges(max_len: int) -> list[int]:
    """0, 64, 128, 256, ... up to max_len (the last bucket ends at max_len)."""
    edges, edge = [0], 64
    while edge < max_len:
        edges.append(edge)
        edge *= 2
    return edges + [max_len]


def _loss_fn(model):
    graphdef, state = nnx.split(model)
    vocab = model.config.vocab_size

    @jax.jit
    def losses(state, inputs, targets, real):  # (b, l) -> (b, l) nats per position, 0 at pads
        model = nnx.merge(graphdef, state)
        table = model.embedding.embedding[...]
        hidden = model.hidden_states(inputs, padding_mask=real)
        out = []
        for s in range(0, inputs.shape[1], CHUNK):
            h = hidden[:, s : s + CHUNK]
            logits = jnp.einsum("bld,vd->blv", h, table.astype(h.dtype),
                                preferred_element_type=jnp.float32)[..., :vocab]  # fmt: skip
            logz = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, targets[:, s : s + CHUNK, None], -1)[..., 0]
            out.append(logz - picked)
        return jnp.concatenate(out, axis=1) * real

    return functools.partial(losses, state)


def position_losses(model, docs: list[np.ndarray], max_len: int, batch_size: int = 8,
                    progress: bool = True):  # fmt: skip
    """Summed loss and token count at each position 0 .. max_len - 1 over `docs` (token arrays;
    a longer one counts its first max_len positions): two (max_len,) float64 arrays."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not docs:
        raise ValueError("no held-out documents of 2 or more tokens to evaluate")
    losses = _loss_fn(model)
    total, count = np.zeros(max_len), np.zeros(max_len)
    order = sorted(range(len(docs)), key=lambda i: -len(docs[i]))  # similar lengths together
    for b in tqdm(range(0, len(order), batch_size), desc="length eval", disable=not progress):
        rows = [docs[i] for i in order[b : b + batch_size]]
        weight = (np.arange(batch_size) < len(rows)).astype(np.float64)
        rows += [rows[-1][:2]] * (batch_size - len(rows))  # fill the last batch; not counted
        inputs = np.zeros((batch_size, max_len), np.int32)
        targets = np.zeros((batch_size, max_len), np.int32)
        real = np.zeros((batch_size, max_len), bool)
        for r, doc in enumerate(rows):
            doc = doc[: max_len + 1]
            n = len(doc) - 1
            inputs[r, :n], targets[r, :n], real[r, :n] = doc[:-1], doc[1:], True
        got = np.asarray(losses(inputs, targets, real), np.float64) * weight[:, None]
        total += got.sum(0)
        count += (real * weight[:, None]).sum(0)
    return total, count


def by_bucket(total: np.ndarray, count: np.ndarray, edges: list[int]) -> list[dict]:
    """Rows {"start", "end", "tokens", "loss"} (mean nats; None where no token reached)."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        n = float(count[lo:hi].sum())
        rows.append({"start": lo, "end": hi, "tokens": int(n),
                     "loss": float(total[lo:hi].sum() / n) if n else None})  # fmt: skip
    return rows


def format_table(rows: list[dict], train_len: int | None) -> str:
    lines = [f"{'positions':>15s} {'tokens':>10s} {'loss':>8s}"]
    for r in rows:
        loss = f"{r['loss']:.4f}" if r["loss"] is not None else "-"
        mark = "  (beyond training length)" if train_len and r["start"] >= train_len else ""
        lines.append(f"{r['start']:>7d}-{r['end'] - 1:<7d} {r['tokens']:>10,d} {loss:>8s}{mark}")
    return "\n".join(lines)


def plot(curves: dict[str, list[dict]], path: str, train_len: int | None = None):
    """Loss against position (log2 axis), one line per run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("--plot needs matplotlib: pip install -e '.[plot]'") from err
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, rows in curves.items():
        xs = [math.sqrt(max(r["start"], 1) * r["end"]) for r in rows if r["loss"] is not None]
        ys = [r["loss"] for r in rows if r["loss"] is not None]
        ax.plot(xs, ys, marker="o", label=name)
    if train_len:
        ax.axvline(train_len, color="gray", linestyle="--", label=f"training length {train_len}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in document (bucket centre)")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_run(run_dir: str, max_len: int | None = None, batch_size: int = 8,
                 max_docs: int | None = None, progress: bool = True) -> dict:  # fmt: skip
    """The bucket table of a train.py run's latest checkpoint on its validation split."""
    from mamba_jax.training.checkpoint import restore_model
    from mamba_jax.training.data import load_corpus

    model, config = restore_model(run_dir)
    if config.data.task is not None:
        raise ValueError(
            f"{run_dir} trained on the synthetic task {config.data.task!r}: the length eval "
            "reads a text corpus (python -m mamba_jax.training.eval_tasks covers tasks)"
        )
    train_len = config.train.seq_len
    max_len = 8 * train_len if max_len is None else max_len
    corpus = load_corpus(config.data, config.model.vocab_size)
    docs = documents(corpus.val_tokens, corpus.tokenizer.eos_id, max_len)
    if max_docs is not None:
        docs = docs[:max_docs]
    total, count = position_losses(model, docs, max_len, batch_size, progress)
    rows = by_bucket(total, count, bucket_edges(max_len))
    return {"run": run_dir, "train_len": train_len, "max_len": max_len,
            "documents": len(docs), "buckets": rows}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="train.py checkpoint.dir(s); several share one plot")  # fmt: skip
    parser.add_argument("--max-len", type=int, default=None,
                        help="positions to evaluate (default 8 x the run's train.seq_len)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-docs", type=int, default=None, help="evaluate at most this many")
    parser.add_argument("--json", default=None, help="write the table here as JSON")
    parser.add_argument("--plot", default=None, help="write a PNG of loss against position")
    args = parser.parse_args(argv)
    results = []
    for run_dir in args.run_dirs:
        result = evaluate_run(run_dir, args.max_len, args.batch_size, args.max_docs)
        print(
            f"{run_dir}: {result['documents']} held-out documents, training length "
            f"{result['train_len']}"
        )
        print(format_table(result["buckets"], result["train_len"]))
        results.append(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results[0] if len(results) == 1 else results, f, indent=1)
    if args.plot:
        curves = {os.path.basename(r["run"].rstrip("/")): r["buckets"] for r in results}
        plot(curves, args.plot, results[0]["train_len"])
        print(f"plot: {args.plot}")
    return results[0] if len(results) == 1 else results


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
