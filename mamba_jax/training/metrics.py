"""What a run reports: metrics.jsonl and TensorBoard, and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import json
import os
import time

import jax

# Dense bf16 peak per chip, for MFU. H100/H200 SXM: 989 TFLOP/s dense bf16 (NVIDIA's H100 and
# H200 datasheets; the H200 has the H100's compute). TPUs: Google's Cloud TPU pages.
PEAK_FLOPS = {
    "h100": 989e12,
    "h200": 989e12,
    "gh200": 989e12,
    "a100": 312e12,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,
    "tpu v6e": 918e12,
}


def peak_flops(device=None) -> float | None:
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops
    return None


def mfu(n_params: int, tokens_per_sec: float, num_devices: int, device=None) -> float | None:
    """Model FLOPs utilisation by the 6N rule (6 FLOPs per parameter per trained token: forward
    and backward matmuls) over the chips' dense bf16 peak; None on unknown devices (CPU)."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return 6.0 * n_params * tokens_per_sec / (peak * num_devices)


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard events, from process 0 only.

    `start_step` is the step the run starts from: records after it (logged by an earlier run
    that died before its next checkpoint) are dropped, so a resumed run's metrics.jsonl holds
    each step once, in order. A fresh run (start_step 0) starts a fresh file."""

    def __init__(self, directory: str, tensorboard: bool = True, start_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metrics.jsonl")
        kept = []
        if os.path.exists(path) and start_step > 0:
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by a kill
                        continue
                    if record.get("step", 0) <= start_step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        self.jsonl = open(path, "w")  # noqa: SIM115
        self.jsonl.writelines(kept)
        self.jsonl.flush()
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, metrics: dict):
        if not self.enabled:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: (None if v is None else float(v)) for k, v in metrics.items()})
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if value is not None:
                    self.tb.add_scalar(key, float(value), int(step))

    def text(self, tag: str, text: str, step: int):
        if self.tb is not None:
            self.tb.add_text(tag, text, int(step))

    def close(self):
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
