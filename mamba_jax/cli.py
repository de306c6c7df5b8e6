"""`python -m mamba_jax.generate`: sample from a converted or a trained model.

    python -m mamba_jax.generate --model PATH --prompt TEXT --max-new-tokens N \\
        [--temperature T] [--top-k K] [--top-p P] [--seed S] [--dtype D] [--tokenizer FILE]

PATH is an HF / mamba_ssm checkpoint directory (config.json + weights, see `convert.py`) or a
training checkpoint directory written by train.py. The tokenizer is `--tokenizer`, else the
model directory's `tokenizer.json`, else the training run's `data.tokenizer`, else bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp

from mamba_jax.convert import is_pretrained_dir, load_pretrained
from mamba_jax.generate import generate
from mamba_jax.tokenizer import load_tokenizer


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
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (HF dirs)")
    p.add_argument("--tokenizer", default=None, help="a tokenizer.json overriding the default")
    return p


def is_training_dir(path: str) -> bool:
    """Orbax step folders (digits) or the run's metrics.jsonl mark a train.py checkpoint dir."""
    names = os.listdir(path)
    steps = [n for n in names if n.isdigit() and os.path.isdir(os.path.join(path, n))]
    return bool(steps) or "metrics.jsonl" in names or "_CHECKPOINT_METADATA" in names


def load_model(path: str, dtype=None):
    """-> (model, tokenizer path or None). Tells the two kinds of directory apart by contents."""
    if not os.path.isdir(path):
        raise ValueError(f"--model must be a directory, got {path!r}")
    if is_pretrained_dir(path):
        tok = os.path.join(path, "tokenizer.json")
        return load_pretrained(path, dtype=dtype), (tok if os.path.isfile(tok) else None)
    if is_training_dir(path):
        from mamba_jax import checkpoint

        model, _ = checkpoint.restore_model(path)
        run_config, _ = checkpoint.read_config(path)  # the run's data.tokenizer, if it had one
        return model, getattr(getattr(run_config, "data", None), "tokenizer", None)
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
    """Parses `argv`, prints the continuation and a timing line; returns the continuation."""
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    t0 = time.perf_counter()
    model, tok_path = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or tok_path)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    if tokenizer.vocab_size > model.config.padded_vocab_size:
        print(
            f"warning: the tokenizer has {tokenizer.vocab_size} tokens, the model {vocab}",
            file=sys.stderr,
        )
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise SystemExit("--prompt encodes to no tokens")
    if max(ids) >= model.config.padded_vocab_size:
        raise SystemExit(f"--prompt has token ids >= the model's vocab ({vocab}): wrong tokenizer?")

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
    text = tokenizer.decode(new)
    print(text)
    print(
        f"[{len(new)} new tokens after a {len(ids)}-token prompt: {len(new) / run_s:,.1f} tokens/s "
        f"({run_s:.3f} s prefill + decode, {compile_s:.2f} s compile, {load_s:.2f} s load) "
        f"on {jax.devices()[0].platform}]",
        file=sys.stderr,
    )
    return text
