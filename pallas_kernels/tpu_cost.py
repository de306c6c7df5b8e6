"""What the TPU scan kernels must move and compute, per shape, against TPU datasheet ceilings.

    from pallas_kernels.tpu_cost import tpu_scan_cost, TPU_CHIPS, SHAPES
    cost = tpu_scan_cost((8, 1536, 2048))            # S1: (b, e, L), d_state 16, bf16 activations
    cost["fwd"]["kernel_bytes"], cost["fwd_bwd"]["floors_ms"]["v5e"]

The scan does no matrix multiplies: its arithmetic is fp32 elementwise work on the vector unit
(VPU) plus one exp per (token, channel, state) on the transcendental unit. So its roofline is
max(HBM time, VPU time); the MXU's bf16 peak, the number the datasheets give, does not bound it.

Ceilings (TPU_CHIPS):
  - HBM GB/s and bf16 TFLOP/s per chip: Google Cloud TPU system-architecture pages, read
    2026-12-01 through the search tool: https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s,
    819 GB/s), https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 2765 GB/s),
    https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 1640 GB/s). No fp32 peak is published
    for any of the three.
  - VPU fp32 ops/s: NOT a datasheet number, an estimate. jax-ml/scaling-book "How to Think About
    TPUs", appendix C: the VPU is (8 sublanes x 128 lanes) and "in v5 you can add 4 pairs of f32
    values together from VREGs in each cycle" (read as 4 vector slots x 1024 lanes per cycle);
    the v5e clock 1.5 GHz is from the same page. The v5p and v6e clocks, 1.75 GHz, are derived
    from the bf16 peak (v5p: 2 TensorCores x 4 MXUs of 128x128; v6e: 4 MXUs of 256x256).
"""

from __future__ import annotations

import dataclasses

SHAPES = {  # name: (b, e, L), the S1-S4 (benchmarks/scan.py)
    "S1": (8, 1536, 2048),
    "S2": (4, 4096, 2048),
    "S3": (2, 2048, 16384),
    "S4": (1, 1536, 131072),
}


@dataclasses.dataclass(frozen=True)
class TpuChip:
    name: str
    hbm_gb_s: float  # datasheet
    bf16_tflop_s: float  # datasheet (MXU)
    tensorcores: int
    vpu_gop_s: float  # estimate, fp32 elementwise ops per second per chip (see module docstring)
    source: str


def _vpu(cores, slots, ghz):
    return cores * slots * 8 * 128 * ghz


TPU_CHIPS = {
    "v5e": TpuChip(
        "v5e", 819.0, 197.0, 1, _vpu(1, 4, 1.5), "https://cloud.google.com/tpu/docs/v5e"
    ),
    "v5p": TpuChip(
        "v5p", 2765.0, 459.0, 2, _vpu(2, 4, 1.75), "https://cloud.google.com/tpu/docs/v5p"
    ),
    "v6e": TpuChip(
        "v6e", 1640.0, 918.0, 1, _vpu(1, 4, 1.75), "https://cloud.google.com/tpu/docs/v6e"
    ),
}

# VPU fp32 ops per (token, channel, state), counted from tpu_scan_kernels.py:
#   forward: Δ'A, exp input, decay*h, Δ'u*B, add, h*C, the sum over states       = 6 (+1 exp)
#   backward: the forward recomputed (6, +2 for y before the gate when z is given), then
#   G = R + g C (2), dC (2), dB (2), d(Δ'u) (2), decay (1), dL/d(Δ'A) (2), dΔ' from A (2),
#   dA (2), R = decay G (1)                                                        = 16 (+1 exp)
_FWD_OPS, _FWD_EXP = 6, 1
_BWD_OPS, _BWD_EXP = 6 + 2 + 16, 2
# Per (token, channel): softplus, Δ'u, D skip, gate (forward ~12, backward ~20, exps counted as ops).
_FWD_TOKEN_OPS, _BWD_TOKEN_OPS = 12, 20


def tpu_scan_cost(shape, n=16, *, act_bytes=2, bc_bytes=2, z=True, seq_tile=512, lanes=128):
    """Bytes and VPU work of one selective scan of shape (b, e, L), forward and forward+backward,
    with the time floors each chip's ceilings imply.

    Returns {"fwd": {...}, "fwd_bwd": {...}} where each holds
      floor_bytes: what any implementation must move through HBM (inputs read once, outputs
        written once; fwd+bwd: the forward, then the backward reading u, delta, z, gy and writing
        du, ddelta, dz, dB, dC);
      kernel_bytes: what these kernels move, counting their layout passes (B, C transposed to fp32
        in XLA and read once per 128-channel tile; dB, dC written per tile; the training forward
        saving one (n, e) state per seq_tile tokens);
      vpu_ops, exps: fp32 elementwise operations and exponentials;
      floors_ms: {chip: {"hbm": ms, "vpu": ms (estimate), "bound": the larger}}.
    """
    b, e, length = shape
    tok = b * length  # tokens
    bles, blns = tok * e, tok * n
    lane_tiles = -(-e // lanes)
    n_act_fwd = (2 + int(z)) + 1  # read u, delta, (z); write y
    bc_read = 2 * blns * bc_bytes
    fwd_floor = n_act_fwd * bles * act_bytes + bc_read
    # XLA transpose of B, C (read bf16, write fp32), then each lane tile reads the fp32 copy.
    bc_layout = 2 * blns * (bc_bytes + 4) + 2 * blns * 4 * lane_tiles
    states = b * e * n * 4 * 3  # h0 in, final state out, A
    fwd_kernel = n_act_fwd * bles * act_bytes + bc_layout + states
    saved = b * -(-length // seq_tile) * n * e * 4  # tile-start states for the backward
    n_act_bwd = (3 + int(z)) + (2 + int(z))  # read u, delta, (z), gy; write du, ddelta, (dz)
    bwd_floor = n_act_bwd * bles * act_bytes + bc_read + 2 * blns * bc_bytes
    bwd_kernel = (
        n_act_bwd * bles * act_bytes
        + 2 * blns * 4 * lane_tiles * 2  # read B^T, C^T; write dB^T, dC^T partials per tile
        + 2 * blns * 4 * lane_tiles
        + 2 * blns * bc_bytes  # XLA: sum the partials, cast
        + saved
        + states
    )
    fwd_ops = bles * (n * _FWD_OPS + _FWD_TOKEN_OPS)
    bwd_ops = bles * (n * _BWD_OPS + _BWD_TOKEN_OPS)
    out = {
        "fwd": dict(
            floor_bytes=fwd_floor,
            kernel_bytes=fwd_kernel,
            vpu_ops=fwd_ops,
            exps=bles * n * _FWD_EXP,
        ),
        "fwd_bwd": dict(
            floor_bytes=fwd_floor + bwd_floor,
            kernel_bytes=fwd_kernel + saved + bwd_kernel,
            vpu_ops=fwd_ops + bwd_ops,
            exps=bles * n * (_FWD_EXP + _BWD_EXP),
        ),
    }
    for entry in out.values():
        entry["floors_ms"] = {}
        for name, chip in TPU_CHIPS.items():
            hbm = entry["kernel_bytes"] / (chip.hbm_gb_s * 1e9) * 1e3
            vpu = entry["vpu_ops"] / (chip.vpu_gop_s * 1e9) * 1e3
            entry["floors_ms"][name] = dict(hbm=hbm, vpu=vpu, bound=max(hbm, vpu))
    return out
