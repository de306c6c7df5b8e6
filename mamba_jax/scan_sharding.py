"""The selective scan and the causal conv on a device mesh: `shard_map` over batch, channels and
length, so that no device ever holds another device's activations.

XLA's partitioner cannot see into the Pallas kernel (a custom call with no partitioning rule):
left to itself it gathers u, delta, z, B and C to full size on every device, runs the whole scan
on each, and slices the result. So under a mesh every scan call runs inside `shard_map`, whatever
the implementation (reference, associative or pallas), on each device's block:

    b  over ("data", "fsdp")   u, delta, z, B, C, segment ids, the states, y
    e  over "tensor"           u, delta, z, A, D, delta_bias, the states, y. B and C are shared by
                               the channels: whole on every tensor shard (shard_map's transpose
                               sums their gradients over "tensor"), or split with their groups
                               when the groups fall evenly on the shards.
    l  over "sequence"         context parallelism, below.

The mesh is the one the computation is traced under (`jax.sharding.get_abstract_mesh()`; the
train step sets it with `sharding.under_mesh`). With no mesh, or every axis of size 1, nothing
here runs and the scan is exactly the unsharded one.

Sequence parallelism. Shard k of K holds times [k T, (k + 1) T). A does not depend on time, so the
state entering a shard, h_in, reaches local time t decayed by a per-channel, per-state factor:

    h_t = exp(A c_t) alive_t h_in + (the shard's own scan from zero)_t,
    c_t = sum_{s <= t} Δ'_s (within the shard),  alive_t = 0 once a new segment has begun.

1. every shard scans its block from a zero state (the kernel included) -> y_loc, h_loc (b, e, n);
2. all_gather over "sequence" of the summaries (S = c_T (b, e), alive_T (b,), h_loc (b, e, n)):
   K small tensors, not activations;
3. a K-step fold of h -> exp(A S_j) alive_j h + h_loc_j gives each shard its h_in, and the final
   state (summed from the last shard with one psum, so every shard returns the same);
4. one fused elementwise pass adds the entering state's part to the outputs:
       y_t += (C_t . exp(A c_t) alive_t h_in) silu(z_t)
   (the gate is linear in y, so the kernel keeps its fused gate). It is rematerialised in the
   backward, so its (b, T, e, n) product is not kept from the forward to the backward.
Autodiff through these JAX ops is the backward, which runs the same exchange in reverse (the
all_gather's transpose is a reduce-scatter). The causal conv needs the previous shard's last
w - 1 inputs: one ppermute of (b, w - 1, e) (`sharded_causal_conv`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from mamba_jax.sharding import BATCH_AXES, MESH_AXES, SEQUENCE_AXIS, TENSOR_AXIS

# MAMBA_JAX_SHARD_MAP=0 turns the wrappers off (the scan is then left to XLA's partitioner, which
# gathers the kernel's operands): for measuring what they save, not for use.
ENABLED = os.environ.get("MAMBA_JAX_SHARD_MAP", "1") != "0"

_log = logging.getLogger(__name__)
_said = set()


def log_once(message: str):
    if message not in _said:
        _said.add(message)
        _log.warning(message)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one call is split: the mesh axes over b, e and l (empty/None: whole) and their sizes.

    groups_split: B/C (b, l, g, n) split over "tensor" with their groups; otherwise they are
    whole on every tensor shard."""

    batch: tuple[str, ...]
    tensor: str | None
    sequence: str | None
    sizes: dict
    groups_split: bool = False

    @property
    def shards(self) -> tuple[int, int, int]:
        """(batch shards, channel shards, length shards)."""
        count = lambda axes: math.prod(self.sizes[a] for a in axes if a)
        return count(self.batch), count((self.tensor,)), count((self.sequence,))

    def spec(self, *dims) -> P:
        """PartitionSpec from letters: b batch, l length, e channels, '.' whole."""
        axis = {"b": self.batch or None, "l": self.sequence, "e": self.tensor, ".": None}
        return P(*(axis[d] for d in dims))


def mesh_axes() -> dict:
    """{axis: size} of the surrounding mesh's scan axes that split something: in MESH_AXES, of
    size > 1 and not already manual (inside someone's shard_map). Empty without a mesh."""
    if not ENABLED:
        return {}
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return {}
    return {
        name: size
        for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
        if name in MESH_AXES and size > 1 and kind != AxisType.Manual
    }


def _check_divides(what, size, axes, sizes):
    count = math.prod(sizes[a] for a in axes)
    if size % count:
        names = " x ".join(axes)
        raise ValueError(
            f"{what}={size} must be a multiple of the {names} mesh size {count} "
            f"(mesh {dict(sizes)}): the scan splits it over {axes}"
        )


def _batch_axes(sizes, bsz) -> tuple[str, ...]:
    """The batch axes of the mesh where they divide b, else () (the batch left whole)."""
    batch = tuple(a for a in BATCH_AXES if a in sizes)
    return batch if bsz % math.prod(sizes[a] for a in batch) == 0 else ()


def scan_layout(bsz: int, length: int, e: int, groups: int) -> Layout | None:
    """The layout of a scan of these sizes on the surrounding mesh, or None (no mesh to use).

    Raises ValueError where a mesh axis does not divide the dimension it splits."""
    sizes = mesh_axes()
    if not sizes:
        return None
    batch = tuple(a for a in BATCH_AXES if a in sizes)
    tensor = TENSOR_AXIS if TENSOR_AXIS in sizes else None
    sequence = SEQUENCE_AXIS if SEQUENCE_AXIS in sizes else None
    _check_divides("batch b", bsz, batch, sizes)
    if sequence:
        _check_divides("length l", length, (sequence,), sizes)
    groups_split = False
    if tensor:
        _check_divides("d_inner e", e, (tensor,), sizes)
        t, p = sizes[tensor], e // groups
        e_loc = e // t
        if e_loc % p == 0:  # each shard holds whole groups: B/C split with them
            groups_split = groups > 1
        elif p % e_loc:  # a group straddles two shards unevenly
            log_once(
                f"selective_scan: {groups} B/C groups of {p} channels do not fall evenly on "
                f"{t} tensor shards of {e_loc} channels; the scan keeps its channels whole "
                f"(replicated over 'tensor')"
            )
            tensor = None
    return Layout(batch, tensor, sequence, sizes, groups_split)


def local_sizes(layout: Layout, bsz, length, e, groups) -> tuple[int, int, int, int]:
    """(b, l, e, g) of one device's block."""
    nb, nt, ns = layout.shards
    e_loc = e // nt
    g_loc = groups // nt if layout.groups_split else max(1, e_loc // (e // groups))
    return bsz // nb, length // ns, e_loc, g_loc


def _shard_map(body, in_specs, out_specs, axes):
    """jax.shard_map over the surrounding mesh, manual over `axes` only.

    check_vma=False: the bodies run code that does not track which values vary across devices
    (Pallas kernels' pipelines, loops whose carries start from constants), and without the
    check the transpose sums the gradients of inputs that are whole on every device of an axis
    over that axis, which is what a replicated parameter needs. Every wrapper here is tested
    against the unsharded computation, gradients included.

    Only the axes that split something (size > 1) turn manual: a manual axis that an input
    does not mention would have its gradient psummed over it, an all-reduce even over a
    one-device group. Axes of size 1 and of other names stay automatic."""
    return jax.shard_map(
        body, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes), check_vma=False
    )


# ----------------------------------------------------------------------------------------------
# The scan.


# selective_scan's arrays in its argument order, and how each is split ("b" batch, "l" length,
# "e" channels, "." whole; B and C are decided per call).
SCAN_ARRAYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "segment_ids")
_SPLITS = dict(u="ble", delta="ble", A="e.", D="e", z="ble", delta_bias="e", initial_state="be.")
_SPLITS.update(segment_ids="bl", keep="bl")


def sharded_scan(block_scan, step_size, layout: Layout, keep, *arrays):
    """selective_scan's arrays (in SCAN_ARRAYS order, None where absent) -> (y, final_state),
    with `block_scan` run on each device's block inside shard_map.

    block_scan(u, delta, A, B, C, D, z, delta_bias, initial_state=, segment_ids=) -> (y, h) is
    one implementation's whole scan; step_size(delta, delta_bias) -> Δ' (b, l, e) fp32.
    keep: (b, l) f32, 0 where a new segment starts, or None without segments; only the length
    split reads it, for the segment boundaries that fall between shards.
    """
    args = dict(zip(SCAN_ARRAYS, arrays, strict=True), keep=keep)
    grouped = args["B"].ndim == 4
    bc = "ble." if layout.groups_split else ("bl.." if grouped else "bl.")
    splits = {**_SPLITS, "B": bc, "C": bc}
    present = {k: v for k, v in args.items() if v is not None}
    if layout.sequence is None:
        present.pop("keep", None)  # each block holds whole rows: segment_ids say it all
    in_specs = {k: layout.spec(*splits[k]) for k in present}
    out_specs = (layout.spec(*"ble"), layout.spec(*"be."))
    e, groups = args["u"].shape[2], args["B"].shape[2] if grouped else 1
    body = functools.partial(_block_scan, block_scan, step_size, layout, e // groups, grouped)
    axes = {*layout.batch, *(a for a in (layout.tensor, layout.sequence) if a)}
    return _shard_map(body, (in_specs,), out_specs, axes)(present)


def _select_groups(layout, p, e_loc, X):
    """X (b, l, g, n) with every group -> (b, l, 1, n): the group of this tensor shard's channels
    (a group spans one or more whole shards here)."""
    k = jax.lax.axis_index(layout.tensor)
    return jax.lax.dynamic_slice_in_dim(X, (k * e_loc) // p, 1, axis=2)


def _block_scan(block_scan, step_size, layout, p, grouped, a):
    """One device's block. a: dict of the block's arrays (see sharded_scan)."""
    u, delta, A, B, C = a["u"], a["delta"], a["A"], a["B"], a["C"]
    if grouped and layout.tensor is not None and not layout.groups_split:
        e_loc = u.shape[2]
        B, C = (_select_groups(layout, p, e_loc, X) for X in (B, C))
    D, z, bias = a.get("D"), a.get("z"), a.get("delta_bias")
    h0, seg = a.get("initial_state"), a.get("segment_ids")
    if layout.sequence is None:
        return block_scan(u, delta, A, B, C, D, z, bias, initial_state=h0, segment_ids=seg)
    y_loc, h_loc = block_scan(u, delta, A, B, C, D, z, bias, initial_state=None, segment_ids=seg)
    return _join_sequence_shards(layout, step_size, y_loc, h_loc, a, C, h0)


def _join_sequence_shards(layout, step_size, y_loc, h_loc, a, C, h0):
    """Steps 2-4 of the module docstring: exchange the shard summaries, fold them in order, and
    add the entering state's part to this shard's outputs and to the final state."""
    axis, K = layout.sequence, layout.sizes[layout.sequence]
    delta, A, z, bias = a["delta"], a["A"], a.get("z"), a.get("delta_bias")
    A = A.astype(jnp.float32)
    dt = step_size(delta, bias)  # (b, T, e)
    S = jnp.sum(dt, axis=1)  # (b, e)
    keep = a.get("keep")
    # alive: 0 for a row where a new segment begins inside this shard (nothing passes through).
    alive_T = jnp.ones(S.shape[:1], jnp.float32) if keep is None else jnp.prod(keep, axis=1)
    S_all = jax.lax.all_gather(S, axis)  # (K, b, e)
    alive_all = jax.lax.all_gather(alive_T, axis)  # (K, b)
    h_all = jax.lax.all_gather(h_loc, axis)  # (K, b, e, n)
    k = jax.lax.axis_index(axis)
    h = jnp.zeros_like(h_loc) if h0 is None else h0.astype(jnp.float32)
    entering = []
    for j in range(K):  # K is small (the sequence mesh size): an unrolled fold
        entering.append(h)
        decay = jnp.exp(A * S_all[j][..., None]) * alive_all[j][:, None, None]  # (b, e, n)
        h = decay * h + h_all[j]
    h_in = jnp.stack(entering)[k]  # (b, e, n)
    y = _add_entering_state(y_loc, delta, bias, keep, A, C, h_in, z, step_size)
    # The last shard's end state is the final state; psum hands it to every shard.
    decay = jnp.exp(A * S[..., None]) * alive_T[:, None, None]
    h_end = jnp.where(k == K - 1, decay * h_in + h_loc, 0.0)
    return y, jax.lax.psum(h_end, axis)


def _add_entering_state(y_loc, delta, bias, keep, A, C, h_in, z, step_size):
    """y_loc + (C_t . exp(A c_t) alive_t h_in) silu(z_t), one fused pass, recomputed in the
    backward. y_loc (b, T, e); C (b, T, n) or (b, T, g, n); h_in (b, e, n)."""

    @jax.checkpoint
    def correction(delta, bias, keep, A, C, h_in):
        dt = step_size(delta, bias)  # (b, T, e)
        c = jnp.cumsum(dt, axis=1)  # (b, T, e)
        Cg = C if C.ndim == 4 else C[:, :, None, :]  # (b, T, g, n)
        bsz, T, e = dt.shape
        g, n = Cg.shape[2], A.shape[1]
        decay = jnp.exp(A.reshape(g, e // g, n) * c.reshape(bsz, T, g, e // g, 1))
        part = Cg.astype(jnp.float32)[:, :, :, None, :] * decay * h_in.reshape(bsz, 1, g, -1, n)
        out = jnp.sum(part, axis=-1).reshape(bsz, T, e)  # (b, T, e)
        if keep is not None:
            out = out * jnp.cumprod(keep, axis=1)[..., None]  # alive_t
        return out

    extra = correction(delta, bias, keep, A, C, h_in)
    if z is not None:
        extra = extra * jax.nn.silu(z.astype(jnp.float32))
    return (y_loc.astype(jnp.float32) + extra).astype(y_loc.dtype)


# ----------------------------------------------------------------------------------------------
# The causal conv's halo.


def sharded_causal_conv(conv, x, kernel, bias, state, mask=None, *, manual=False):
    """conv(x, kernel, bias, state, mask) -> (out, new_state) on x (b, l, e), kernel (w, e), bias
    (e,) or None, state (b, w - 1, e) or None, mask (b, l, w) or None (per position, so it splits
    along l like x): called directly without a sequence split, else inside
    shard_map with each shard's state taken from the previous shard's last w - 1 inputs (one
    ppermute). The new state, the last w - 1 inputs of the whole sequence, comes from the last
    shard. manual=True (conv is a kernel XLA cannot partition): inside shard_map over the batch
    and channel axes too when the length is not split."""
    w = kernel.shape[0]
    sizes = mesh_axes()
    K = sizes.get(SEQUENCE_AXIS, 1)
    bsz, length, e = x.shape
    split = not (K == 1 or w == 1 or length % K or length // K < w - 1)
    if not split and not (manual and sizes):
        return conv(x, kernel, bias, state, mask)
    if not split:
        sizes = {a: n for a, n in sizes.items() if a != SEQUENCE_AXIS}
    batch = _batch_axes(sizes, bsz)
    tensor = TENSOR_AXIS if TENSOR_AXIS in sizes and e % sizes[TENSOR_AXIS] == 0 else None
    layout = Layout(batch, tensor, SEQUENCE_AXIS if split else None, sizes)
    args = dict(x=x, kernel=kernel, bias=bias, state=state, mask=mask)
    specs = dict(
        x=layout.spec("b", "l", "e"),
        mask=layout.spec("b", "l", "."),
        kernel=layout.spec(".", "e"),
        bias=layout.spec("e"),
        state=layout.spec("b", ".", "e"),
    )
    present = {k: v for k, v in args.items() if v is not None}
    in_specs = {k: specs[k] for k in present}
    out_specs = (layout.spec("b", "l", "e"), layout.spec("b", ".", "e"))
    axes = {*batch, *(a for a in (tensor, SEQUENCE_AXIS if split else None) if a)}
    if not axes:  # nothing divides: every device runs the whole call
        return conv(x, kernel, bias, state, mask)

    def body(a):
        x = a["x"]
        if not split:
            return conv(x, a["kernel"], a.get("bias"), a.get("state"), a.get("mask"))
        k = jax.lax.axis_index(SEQUENCE_AXIS)
        # Shard j's last w - 1 inputs go to shard j + 1; shard 0 receives zeros (or the state).
        halo = jax.lax.ppermute(x[:, -(w - 1) :], SEQUENCE_AXIS, [(j, j + 1) for j in range(K - 1)])
        if "state" in a:
            halo = jnp.where(k == 0, a["state"].astype(halo.dtype), halo)
        out, new_state = conv(x, a["kernel"], a.get("bias"), halo, a.get("mask"))
        new_state = jnp.where(k == K - 1, new_state, jnp.zeros_like(new_state))
        return out, jax.lax.psum(new_state, SEQUENCE_AXIS)

    return _shard_map(body, (in_specs,), out_specs, axes)(present)


# ----------------------------------------------------------------------------------------------
# Sums over tokens (the loss).


def sum_over_token_shards(fn, tokens: dict, whole: dict):
    """fn(**tokens, **whole) -> a tuple of sums over every token, with the length split: each
    device sums its own (b, l) block and one psum adds the blocks. tokens: arrays (b, l, ...);
    whole: arrays every device needs entire (the head's table: a parameter-sized gather, where
    left to itself XLA would gather the activations instead). Without a sequence split it is
    fn called directly."""
    sizes = mesh_axes()
    if SEQUENCE_AXIS not in sizes:
        return fn(**tokens, **whole)
    bsz, length = next(iter(tokens.values())).shape[:2]
    batch = _batch_axes(sizes, bsz)
    _check_divides("length l", length, (SEQUENCE_AXIS,), sizes)
    axes = (*batch, SEQUENCE_AXIS)

    def body(tokens, whole):
        return jax.tree.map(lambda s: jax.lax.psum(s, axes), fn(**tokens, **whole))

    spec = P(batch or None, SEQUENCE_AXIS)
    in_specs = ({k: spec for k in tokens}, {k: P() for k in whole})
    run = _shard_map(body, in_specs, P(), axes)
    return run(tokens, whole)
