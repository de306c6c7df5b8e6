"""Trains a Mamba language model: config -> distributed init -> mesh -> model/optimizer -> restore
-> loop (log, eval, checkpoint) -> sample.

    # CPU smoke run (the `make train` default): bytes of the Python stdlib, a few minutes
    python train.py --config configs/tiny.yaml
    # any key can be overridden as section.key=value
    python train.py --config configs/tiny.yaml train.steps=200 checkpoint.dir=runs/try
    # 130m on one GPU with a GPT-NeoX tokenizer and your own text
    python train.py --config configs/mamba_130m.yaml data.tokenizer=tokenizer.json \
        data.train_path='corpus/*.txt' train.grad_accum=16
    # pre-tokenized corpus (flat uint16 file), FSDP over 8 GPUs x 2 tensor-parallel
    python train.py --config configs/mamba_1.4b.yaml data.train_path=train.bin \
        data.val_path=val.bin mesh.data=1 mesh.fsdp=-1 mesh.tensor=2
    # several hosts: one process per host (or per GPU), see the README for SLURM / Cloud TPU
    python train.py --config configs/mamba_2.8b.yaml distributed.mode=on

Run it again with the same checkpoint.dir and it resumes from the latest complete checkpoint
(parameters, optimizer, step, RNG and data position); a run that already reached train.steps
only prints its sample again. SIGTERM, train.stop_at=N and train.time_limit_s=S each save a
checkpoint, then exit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from mamba_jax import sharding as shd
from mamba_jax.model import count_params
from mamba_jax.sampling import generate
from mamba_jax.training import trainer
from mamba_jax.training.checkpoint import Checkpointer, PreemptionFlag
from mamba_jax.training.data import build_data, check_batch
from mamba_jax.training.distributed import init_distributed
from mamba_jax.training.metrics import MetricsWriter, mfu
from mamba_jax.training.run_config import Config, load_config


def parse_args(argv) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def log(msg):
    if jax.process_index() == 0:
        print(msg, flush=True)


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None)


def sample(graphdef, params, tokenizer, config: Config, rng_data) -> str:
    model = nnx.merge(graphdef, params)
    prompt = tokenizer.encode(config.train.sample_prompt) or [tokenizer.eos_id]
    rng = jax.random.wrap_key_data(np.asarray(rng_data))
    out = generate(model, np.asarray([prompt], np.int32), config.train.sample_tokens,
                   temperature=0.8, top_p=0.95, rng=rng)  # fmt: skip
    return tokenizer.decode(np.asarray(out[0]).tolist())


def main(argv=None) -> dict:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    init_distributed(config)
    mesh = shd.make_mesh(config.mesh)
    check_batch(config, mesh)
    tc, pid, nproc = config.train, jax.process_index(), jax.process_count()
    log(f"devices: {jax.device_count()} ({jax.devices()[0].device_kind}), processes: {nproc}, "
        f"mesh: {dict(mesh.shape)}")  # fmt: skip

    # Data: every process reads its own slice of each global batch.
    data_iter, val, tokenizer, bytes_per_token = build_data(config, pid, nproc, log)

    # Model and optimizer state, built sharded, or restored from the latest complete checkpoint.
    tx = trainer.make_optimizer(tc)
    ckpt = Checkpointer(config.checkpoint)
    latest = ckpt.latest_step()
    if latest is not None and not config.checkpoint.resume:
        raise ValueError(
            f"checkpoint.dir={config.checkpoint.dir!r} already holds checkpoints (latest step "
            f"{latest}) and checkpoint.resume=false: pick a new checkpoint.dir or delete it"
        )
    if latest is not None:
        graphdef, abstract, shardings = trainer.train_state_shardings(config.model, tx, mesh)
        state = ckpt.restore(latest, abstract, shardings, data_iter)
        log(f"resumed from {config.checkpoint.dir} step {latest}")
    else:
        graphdef, state, shardings = trainer.init_state(config.model, tx, mesh, tc.seed)
    n_params = count_params(state["params"])
    log(f"model: {n_params:,} parameters; {config.model}")
    train_step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    eval_step = trainer.make_eval_step(graphdef, shardings, mesh)

    start = int(state["step"])
    writer = MetricsWriter(config.checkpoint.dir, tc.tensorboard, start_step=start)
    preempt = PreemptionFlag().install()
    if start >= tc.steps:
        log(f"the checkpoint is at step {start} >= train.steps={tc.steps}: nothing to train "
            "(raise train.steps to continue, or use a new checkpoint.dir to start over)")  # fmt: skip
    progress = None
    if tc.progress and pid == 0:
        from tqdm import tqdm

        progress = tqdm(total=tc.steps, initial=start, desc="train", dynamic_ncols=True)

    loop_start = last_time = time.perf_counter()
    last_logged = start
    metrics, saved_at, stopped = {}, None, None
    last_step = tc.steps if tc.stop_at is None else min(tc.steps, tc.stop_at)
    for step in range(start, last_step):
        batch = trainer.global_batch(next(data_iter), mesh)
        state, step_metrics = train_step(state, batch)
        done = step + 1
        # Agreed by all processes, so that they all leave at the same step.
        time_up = tc.time_limit_s is not None and time.perf_counter() - loop_start > tc.time_limit_s
        if preempt.should_stop(time_up):
            stopped = "time limit" if time_up else "SIGTERM"
        final = done == last_step or stopped is not None
        if done % tc.log_every == 0 or final:
            metrics = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
            now = time.perf_counter()
            tokens = (done - last_logged) * tc.batch_size * tc.seq_len
            metrics["tokens_per_sec"] = tokens / max(now - last_time, 1e-9)
            metrics["mfu"] = mfu(n_params, metrics["tokens_per_sec"], jax.device_count())
            last_time, last_logged = now, done
            # No eval when stopping early: a preempted job has seconds left, not minutes.
            if done % tc.eval_every == 0 or (final and stopped is None):
                with_accuracy = config.data.task is not None
                metrics.update(trainer.eval_loss(
                    eval_step, state["params"], val, mesh, bytes_per_token, with_accuracy
                ))
                last_time = time.perf_counter()  # keep eval out of the throughput
            writer.write(done, metrics)
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                                     tok_s=f"{metrics['tokens_per_sec']:,.0f}")  # fmt: skip
            else:
                log(f"step {done}: " + format_metrics(metrics))
        if progress is not None:
            progress.update(1)
        if stopped is not None:
            log(f"{stopped}: saving step {done} and exiting")
            ckpt.save(done, state, data_iter, config, force=True)
            saved_at = done
            break
        if done % config.checkpoint.every == 0:
            ckpt.save(done, state, data_iter, config)
            saved_at = done

    train_seconds = time.perf_counter() - loop_start
    end = int(state["step"])
    if saved_at != end and end > start:
        ckpt.save(end, state, data_iter, config, force=True)
    ckpt.close()
    preempt.uninstall()
    if progress is not None:
        progress.close()
    if metrics and progress is not None:  # without tqdm the loop already printed it
        log(f"step {end}: " + format_metrics(metrics))

    if end == tc.steps and tc.sample_tokens > 0 and tokenizer is not None:
        text = sample(graphdef, state["params"], tokenizer, config, state["rng"])
        log(f"--- sample ({tc.sample_tokens} tokens) ---\n{text}\n---")
        writer.text("sample", text, end)
    writer.close()
    summary = {"step": end, "start_step": start, "stopped": stopped,
               "train_seconds": round(train_seconds, 2), **metrics}  # fmt: skip
    if pid == 0 and end > start:  # a run with nothing to train keeps the last summary
        with open(os.path.join(config.checkpoint.dir, "train_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad configuration or data: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
