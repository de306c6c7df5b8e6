"""`python -m mamba_jax.generate`: sample from a converted or a trained model.

    python -m mamba_jax.generate --model PATH --prompt TEXT --max-new-tokens N \\
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--dtype D] [--tokenizer FILE]

PATH is an HF / mamba_ssm checkpoint directory (config.json + weights, see `convert.py`), a
training checkpoint directory written by train.py (its latest step), or one step folder of it.
The tokenizer is `--tokenizer`, else PATH's `tokenizer.json` (through `tokenizers`), else the
training run's `data.tokenizer`, else bytes. The continuation goes to stdout, cut at the first
end-of-text token; the token count and tokens/s go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from mamba_jax.convert import cast_model, is_pretrained_dir, load_pretrained
from mamba_jax.generate import generate
from mamba_jax.tokenizer import find_tokenizer, load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mamba_jax.generate", description="Continue a prompt with a Mamba model."
    )
    p.add_argument("--model", required=True, help="HF/mamba_ssm or training checkpoint directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: stored)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json overriding the default")
    p.add_argument("--ignore-eos", action="store_true", help="print past end-of-text tokens")
    return p


def _is_step(path: str) -> bool:
    return os.path.basename(os.path.normpath(path)).isdigit()


def is_training_dir(path: str) -> bool:
    """Orbax step folders (digits) or the run's metrics.jsonl mark a train.py checkpoint dir."""
    names = os.listdir(path)
    steps = [n for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n))]
    return bool(steps) or "metrics.jsonl" in names or "_CHECKPOINT_METADATA" in names


def _load_training_run(path: str, dtype):
    from mamba_jax import checkpoint

    step = None
    parent = os.path.dirname(os.path.normpath(path))
    if _is_step(path) and is_training_dir(parent):  # PATH is one step folder of a run
        path, step = parent, int(os.path.basename(os.path.normpath(path)))
    model, _ = checkpoint.restore_model(path, step)
    run_config, _ = checkpoint.read_config(path, step)
    tokenizer = find_tokenizer(path)
    if tokenizer is None:
        tokenizer = run_config.data.tokenizer
        if tokenizer is not None and not os.path.exists(tokenizer):
            raise ValueError(
                f"the training run in {path!r} used data.tokenizer={tokenizer!r}, which does not "
                "exist here; pass --tokenizer"
            )
    return (model if dtype is None else cast_model(model, dtype)), tokenizer


def load_model(path: str, dtype=None):
    """-> (model, tokenizer path or None). Tells the two kinds of directory apart by contents."""
    if not os.path.isdir(path):
        raise ValueError(f"--model must be a directory, got {path!r}")
    if is_pretrained_dir(path):
        return load_pretrained(path, dtype=dtype), find_tokenizer(path)
    parent = os.path.dirname(os.path.normpath(path))
    if is_training_dir(path) or (_is_step(path) and is_training_dir(parent)):
        return _load_training_run(path, dtype)
    raise ValueError(
        f"--model {path!r} is neither an HF/mamba_ssm checkpoint (config.json with "
        "model.safetensors or pytorch_model.bin) nor a training checkpoint directory "
        "(numbered step folders)"
    )


class _CompileTimer:
    """Time spent tracing, lowering and compiling while active, as the union of JAX's compile
    time spans (spans nest: an inner jit is traced inside the outer trace)."""

    def __enter__(self):
        self.spans = []
        jax.monitoring.register_event_time_span_listener(self._on_span)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_time_span_listener(self._on_span)

    def _on_span(self, event, start, end, **_):
        if event.startswith("/jax/core/compile/"):
            self.spans.append((start, end))

    @property
    def seconds(self) -> float:
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.spans):
            total += max(0.0, end - max(start, reach))
            reach = max(reach, end)
        return total


def generate_main(argv=None) -> str:
    """Parses `argv`, prints the continuation and a timing line; returns the continuation.

    Bad arguments raise ValueError naming the flag; `main` turns that into an exit message."""
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    t0 = time.perf_counter()
    model, tok_path = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or tok_path)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > vocab:
        print(
            f"warning: the tokenizer has {tokenizer.vocab_size} tokens, the model {vocab}",
            file=sys.stderr,
        )
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt encodes to no tokens")
    if max(ids) >= vocab:
        raise ValueError(
            f"--prompt has token id {max(ids)} >= the model's vocab_size {vocab}: wrong "
            "tokenizer? (without tokenizer.json in the model directory it is bytes; see "
            "--tokenizer)"
        )

    t0 = time.perf_counter()
    with _CompileTimer() as timer:
        out = generate(
            model, jnp.asarray([ids], jnp.int32), args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            rng=jax.random.key(args.seed),
        )  # fmt: skip
        new = jax.device_get(out)[0, len(ids) :].tolist()
    total_s = time.perf_counter() - t0
    compile_s = min(timer.seconds, total_s)
    run_s = max(total_s - compile_s, 1e-9)
    shown = new
    if not args.ignore_eos and tokenizer.eos_id in new:
        shown = new[: new.index(tokenizer.eos_id)]
    text = tokenizer.decode(shown)
    print(text)
    stop = f", shown up to end-of-text ({len(shown)})" if len(shown) < len(new) else ""
    print(
        f"[{len(new)} new tokens after a {len(ids)}-token prompt{stop}: "
        f"{len(new) / run_s:,.1f} tokens/s ({run_s:.3f} s prefill + decode, {compile_s:.2f} s "
        f"compile, {load_s:.2f} s load) on {jax.devices()[0].platform}]",
        file=sys.stderr,
    )
    return text


def main(argv=None) -> None:
    """The command: like `generate_main`, with a bad argument or checkpoint a one-line error."""
    try:
        generate_main(argv)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
