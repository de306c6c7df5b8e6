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
import math
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from mamba_jax import sharding as shd
from mamba_jax import trainer
from mamba_jax.checkpoint import Checkpointer, PreemptionFlag
from mamba_jax.config import Config, load_config


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def distributed_wanted(dist, environ=os.environ) -> bool:
    """Whether to call jax.distributed.initialize: always with mode on, never with off; with auto
    when a coordinator is given (flag or JAX_COORDINATOR_ADDRESS), when SLURM runs several tasks,
    or when a Cloud TPU slice lists several workers (TPU_WORKER_HOSTNAMES)."""
    if dist.mode != "auto":
        return dist.mode == "on"
    hosts = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return bool(
        dist.coordinator_address is not None
        or environ.get("JAX_COORDINATOR_ADDRESS")
        or int(environ.get("SLURM_NTASKS", "1") or 1) > 1
        or len(hosts) > 1
    )


def init_distributed(config: Config):
    """jax.distributed.initialize from the config, or from the environment (SLURM, Cloud TPU):
    arguments left unset are auto-detected by JAX."""
    dist = config.distributed
    if not distributed_wanted(dist):
        return
    # CPU processes need a collectives backend to talk to each other; GPU/TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if dist.coordinator_address is not None:
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.num_processes is not None:
        kwargs["num_processes"] = dist.num_processes
    if dist.process_id is not None:
        kwargs["process_id"] = dist.process_id
    if dist.local_device_ids is not None:
        kwargs["local_device_ids"] = [int(i) for i in dist.local_device_ids.split(",")]
    jax.distributed.initialize(**kwargs)


def make_data(config: Config, pid: int, nproc: int):
    """(training iterator, validation batches, tokenizer or None, bytes per token or None)."""
    tc, dc = config.train, config.data
    if dc.task is not None:
        from mamba_jax.tasks import task_eval_batches, task_train_dataset

        vocab = config.model.vocab_size
        train = task_train_dataset(dc.task, tc.seq_len, vocab, tc.batch_size, dc.seed, pid, nproc)
        val = task_eval_batches(dc.task, tc.seq_len, vocab, tc.batch_size, tc.eval_batches,
                                dc.seed, pid, nproc)  # fmt: skip
        log(f"data: synthetic task {dc.task}, length {tc.seq_len}")
        return iter(train), val, None, None
    from mamba_jax.data import eval_batches, load_corpus, train_dataset

    corpus = load_corpus(dc, config.model.vocab_size)
    train = train_dataset(corpus.train_tokens, tc.seq_len, tc.batch_size, dc.seed, pid, nproc)
    val = eval_batches(corpus.val_tokens, tc.seq_len, tc.batch_size, tc.eval_batches, pid, nproc)
    log(f"data: {len(corpus.train_tokens):,} training / {len(corpus.val_tokens):,} validation "
        f"tokens, vocab {corpus.tokenizer.vocab_size}")  # fmt: skip
    return iter(train), val, corpus.tokenizer, corpus.bytes_per_token


def check_batch(config: Config, mesh):
    train, shards = config.train, shd.batch_divisor(mesh)
    micro = train.batch_size // train.grad_accum
    if micro % shards:
        raise ValueError(
            f"train.batch_size / train.grad_accum = {micro} must be a multiple of the data x fsdp "
            f"mesh size {shards} (mesh {dict(mesh.shape)})"
        )


def log(msg):
    if jax.process_index() == 0:
        print(msg, flush=True)


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None)


def evaluate(eval_step, params, batches, mesh, bytes_per_token, with_accuracy):
    total = count = correct = 0.0
    for batch in batches:
        t, c, k = jax.device_get(eval_step(params, trainer.global_batch(batch, mesh)))
        total, count, correct = total + float(t), count + float(c), correct + float(k)
    loss = total / max(count, 1.0)
    out = {"eval_loss": loss}
    if bytes_per_token:  # nats per token -> bits per byte
        out["eval_bpb"] = loss / math.log(2) / bytes_per_token
    if with_accuracy:
        out["eval_accuracy"] = correct / max(count, 1.0)
    return out


def sample(graphdef, params, tokenizer, config: Config, rng_data):
    from mamba_jax.generate import generate

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
    data_iter, val, tokenizer, bytes_per_token = make_data(config, pid, nproc)

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
        graphdef, abstract, shardings = trainer.state_shardings(config.model, tx, mesh)
        state = ckpt.restore(latest, abstract, shardings, data_iter)
        log(f"resumed from {config.checkpoint.dir} step {latest}")
    else:
        graphdef, state, shardings = trainer.init_state(config.model, tx, mesh, tc.seed)
    n_params = trainer.count_params(state["params"])
    log(f"model: {n_params:,} parameters; {config.model}")
    train_step = trainer.make_train_step(graphdef, tx, tc, shardings, mesh)
    eval_step = trainer.make_eval_step(graphdef, shardings, mesh)

    start = int(state["step"])
    writer = trainer.MetricsWriter(config.checkpoint.dir, tc.tensorboard, start_step=start)
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
            metrics["mfu"] = trainer.mfu(n_params, metrics["tokens_per_sec"], jax.device_count())
            last_time, last_logged = now, done
            # No eval when stopping early: a preempted job has seconds left, not minutes.
            if done % tc.eval_every == 0 or (final and stopped is None):
                metrics.update(
                    evaluate(
                        eval_step,
                        state["params"],
                        val,
                        mesh,
                        bytes_per_token,
                        with_accuracy=config.data.task is not None,
                    )  # fmt: skip
                )
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
    main()
