"""The device mesh and how parameters, optimizer state and batches are laid out on it.

Mesh axes:
    data      pure data parallelism: parameters replicated, the batch split
    fsdp      the batch split too, and the large matrices split along d_model (ZeRO-3 style)
    tensor    d_inner split: in_proj/conv/x_proj/dt_proj/A/D/out_proj each hold e / tensor
              channels, so the selective scan, elementwise in e, runs on each shard's channels alone
    sequence  the length split (context parallelism): parameters replicated, every activation
              holds l / sequence positions; the scan and the conv exchange only small per-shard
              summaries (`scan_sharding`)

Every parameter carries logical axis names (`nnx.with_partitioning`); `LOGICAL_RULES` is the one
table that maps them to mesh axes. A dimension that a mesh axis does not divide stays replicated
rather than failing, so small presets run on any mesh.

The mesh uses `AxisType.Auto` on purpose: the model code carries logical names only, not
per-op output shardings, so the compiler's propagation places the activations; the train step
pins parameters, optimizer state and batch with explicit `in_shardings`/`out_shardings`, and is
traced `under_mesh` so that the scan and the conv, opaque to the compiler, run inside shard_map.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_jax.config import MeshConfig

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")
TENSOR_AXIS = "tensor"
SEQUENCE_AXIS = "sequence"

# logical name -> mesh axis (None: replicated)
LOGICAL_RULES = {
    "layers": None,  # the stacked-layer axis; nnx.scan walks it
    "embed": "fsdp",  # d_model: FSDP shards the large matrices along it
    "inner": "tensor",  # d_inner: tensor parallelism
    "vocab": "tensor",
    "conv": None,
}


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int, int]:
    """Resolves -1 (fill) and checks that the product equals `num_devices`."""
    sizes = [getattr(config, a) for a in MESH_AXES]
    given = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"mesh ({given}) cannot fill {num_devices} devices: {num_devices} is not a "
                f"multiple of {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data*fsdp*tensor*sequence = {math.prod(sizes)} (sizes {tuple(sizes)}) must "
            f"equal the number of devices, {num_devices}"
        )
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor", "sequence") mesh over all devices (all processes), Auto axes."""
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(config, len(devices))
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if devices is jax.devices() or len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def under_mesh(fn, mesh):
    """`fn` traced with `mesh` as the surrounding (abstract) mesh, which the selective scan and the
    causal conv read to run inside shard_map (see scan_sharding). Wrap a function before jit."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def logical_to_spec(names, shape, mesh) -> P:
    """Logical axis names of one array -> PartitionSpec, replicating dims the axis doesn't divide."""
    if names is None:
        return P()
    if len(names) != len(shape):
        raise ValueError(f"logical names {names} do not match the array's shape {shape}")
    spec = []
    for name, dim in zip(names, shape):
        axis = LOGICAL_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(LOGICAL_RULES)}")
        if axis is not None and dim % _axis_size(mesh, axis):
            axis = None
        spec.append(axis)
    return P(*spec)


def _axis_size(mesh, axis) -> int:
    return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


def _names(variable) -> tuple | None:
    meta = variable.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def param_specs(abstract_state: nnx.State, mesh) -> nnx.State:
    """PartitionSpecs for an nnx.State of Variables, from their logical axis metadata."""

    def spec(variable):
        return logical_to_spec(_names(variable), variable.shape, mesh)

    return jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(abstract_state: nnx.State, mesh) -> nnx.State:
    """NamedShardings with the same tree structure as `abstract_state` (Variables kept)."""

    def sharding(variable):
        spec = logical_to_spec(_names(variable), variable.shape, mesh)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh) -> NamedSharding:
    """Every array of a batch (b, l): b split over data x fsdp, l over sequence (where the mesh
    has that axis)."""
    sequence = SEQUENCE_AXIS if SEQUENCE_AXIS in mesh.axis_names else None
    return NamedSharding(mesh, P(BATCH_AXES, sequence))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def length_divisor(mesh) -> int:
    return mesh.shape.get(SEQUENCE_AXIS, 1)


def sequence_within_processes(mesh) -> bool:
    """True when the devices that split one row's length all belong to one process (each
    process's data pipeline reads whole rows)."""
    if SEQUENCE_AXIS not in mesh.axis_names:
        return True
    procs = np.vectorize(lambda d: d.process_index)(np.asarray(mesh.devices))
    first = np.take(procs, [0], axis=mesh.axis_names.index(SEQUENCE_AXIS))
    return bool(np.all(procs == first))
