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

from mamba_jax.convert import is_pretrained_dir
from mamba_jax.loading import load_model, read_run_config_dict, split_run_path
from mamba_jax.sampling import generate
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


def find_model_tokenizer(path: str) -> str | None:
    """The tokenizer.json that goes with a model directory: the directory's own, else (for a
    training run) the run's `data.tokenizer`; None means bytes."""
    found = find_tokenizer(path)
    run = split_run_path(path) if found is None and not is_pretrained_dir(path) else None
    if run is None:
        return found
    tree, _ = read_run_config_dict(*run)
    tokenizer = (tree.get("data") or {}).get("tokenizer")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ValueError(
            f"the training run in {run[0]!r} used data.tokenizer={tokenizer!r}, which does not "
            "exist here; pass --tokenizer"
        )
    return tokenizer


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
    if not os.path.isdir(args.model):
        raise ValueError(f"--model must be a directory, got {args.model!r}")
    model = load_model(args.model, args.dtype)
    tokenizer = load_tokenizer(args.tokenizer or find_model_tokenizer(args.model))
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
            model,
            jnp.asarray([ids], jnp.int32),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            rng=jax.random.key(args.seed),
        )
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


if __name__ == "__main__":
    main()
