"""Mesh construction, logical-axis rules, and sharded train steps equal to the unsharded one."""

import re

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mamba_jax import sharding as shd
from mamba_jax.config import MambaConfig, MeshConfig
from mamba_jax.model import abstract_model
from mamba_jax.training import trainer
from mamba_jax.training.run_config import TrainConfig

MODEL = MambaConfig(d_model=32, n_layer=2, vocab_size=257, scan_impl="reference")


def test_mesh_shape_fill_and_errors():
    assert shd.mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2, 1)
    assert shd.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=2), 8) == (1, 4, 2, 1)
    assert shd.mesh_shape(MeshConfig(data=2, fsdp=1, sequence=-1), 8) == (2, 1, 1, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        shd.mesh_shape(MeshConfig(data=-1, fsdp=3, tensor=1), 8)
    with pytest.raises(ValueError, match="must equal"):
        shd.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)
    with pytest.raises(ValueError, match="sequence=0"):
        MeshConfig(sequence=0)
    mesh = shd.make_mesh(MeshConfig(data=2, fsdp=2, tensor=1, sequence=2))
    assert mesh.axis_names == shd.MESH_AXES == ("data", "fsdp", "tensor", "sequence")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1, "sequence": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"), "sequence")
    assert shd.sequence_within_processes(mesh)


def test_check_batch_names_the_sequence_axis():
    from mamba_jax.training.data import check_batch
    from mamba_jax.training.run_config import Config

    mesh = shd.make_mesh(MeshConfig(data=2, sequence=4))
    check_batch(Config(train=TrainConfig(batch_size=4, seq_len=16)), mesh)
    with pytest.raises(ValueError, match="train.seq_len=18 must be a multiple of the sequence"):
        check_batch(Config(train=TrainConfig(batch_size=4, seq_len=18)), mesh)


def test_parameter_specs_follow_the_rules():
    mesh = shd.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    abstract = nnx.state(abstract_model(MODEL))
    specs = trainer.pure(shd.param_specs(abstract, mesh))
    mixer = specs["layers"]["mixer"]
    assert mixer["in_proj"]["kernel"] == P(None, "fsdp", "tensor")  # (layers, d, 2e)
    assert mixer["out_proj"]["kernel"] == P(None, "tensor", "fsdp")  # (layers, e, d)
    assert mixer["x_proj"]["kernel"] == P(None, "tensor", None)
    assert mixer["dt_proj"]["kernel"] == P(None, None, "tensor")
    for name in ("A_log", "D"):
        assert mixer[name][1] == "tensor"
    assert mixer["conv1d"]["kernel"] == P(None, None, "tensor")
    assert specs["embedding"]["embedding"] == P("tensor", "fsdp")
    # A dimension the axis does not divide stays whole: dt_rank 2 over tensor=4 would not split.
    assert shd.logical_to_spec(("inner", None), (6, 3), mesh) == P("tensor", None)
    assert shd.logical_to_spec(("embed", "inner"), (6, 3), mesh) == P(None, None)
    with pytest.raises(ValueError, match="no rule"):
        shd.logical_to_spec(("heads",), (4,), mesh)


def test_decay_mask():
    abstract = nnx.state(abstract_model(MODEL))
    mask = trainer.decay_mask(trainer.pure(abstract))
    mixer = mask["layers"]["mixer"]
    assert mixer["in_proj"]["kernel"] and mixer["out_proj"]["kernel"] and mixer["x_proj"]["kernel"]
    assert mixer["dt_proj"]["kernel"] and mixer["conv1d"]["kernel"]
    assert not any(
        [
            mixer["A_log"],
            mixer["D"],
            mixer["conv1d"]["bias"],
            mixer["dt_proj"]["bias"],
            mask["layers"]["norm"]["weight"],
            mask["norm_f"]["weight"],
            mask["embedding"]["embedding"],
        ]
    )


def test_lr_schedule_warmup_cosine_floor():
    config = TrainConfig(steps=100, lr=1e-3, min_lr=1e-5, warmup_steps=10)
    schedule = trainer.lr_schedule(config)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-5)
    np.testing.assert_allclose(float(schedule(100)), 1e-5, rtol=1e-4)
    assert 1e-5 < float(schedule(55)) < 1e-3


def _batch(b, length, seed=0):
    tokens = np.random.default_rng(seed).integers(0, 257, (b, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _train(mesh_config, train_config, steps=2, devices=None, model=MODEL):
    mesh = shd.make_mesh(mesh_config, jax.devices()[:devices] if devices else None)
    tx = trainer.make_optimizer(train_config)
    graphdef, state, shardings = trainer.init_state(model, tx, mesh, seed=0)
    step = trainer.make_train_step(graphdef, tx, train_config, shardings, mesh)
    losses = []
    for i in range(steps):
        batch = trainer.global_batch(_batch(train_config.batch_size, 16, seed=i), mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state


# (accum, meshes over data, fsdp, tensor, sequence): the length split with accum 1 only, to keep
# the test short (accumulation splits the batch axis, which the sequence split leaves alone).
STEP_MESHES = {
    1: [(1, 4, 2, 1), (2, 2, 2, 1), (1, 1, 2, 4), (2, 1, 1, 4)],
    2: [(1, 4, 2, 1), (2, 2, 2, 1)],
}


@pytest.mark.parametrize("accum", [1, 2])
def test_sharded_step_equals_unsharded(assert_close, accum):
    """Mesh shapes (FSDP x tensor, three axes, and the length split) against one device."""
    config = TrainConfig(
        steps=10, batch_size=8, seq_len=16, warmup_steps=1, grad_accum=accum, lr=1e-2
    )
    ref_losses, ref_params, _ = _train(MeshConfig(data=1, fsdp=1, tensor=1), config, devices=1)
    for shape in STEP_MESHES[accum]:
        losses, params, state = _train(MeshConfig(*shape), config)
        assert_close(np.asarray(losses), np.asarray(ref_losses), err_msg=f"loss {shape}")
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)
        ):
            assert_close(a, b, grad=True, err_msg=f"{shape} {jax.tree_util.keystr(path)}")
        kernel = state["params"]["layers"]["mixer"]["in_proj"]["kernel"]
        assert kernel.sharding.spec == P(None, "fsdp", "tensor")
        assert len(kernel.addressable_shards) == 8
        assert kernel.addressable_shards[0].data.shape == (2, 32 // shape[1], 128 // shape[2])
    assert ref_losses[1] < ref_losses[0] + 0.5  # it trains, not just agrees


def test_sharded_step_with_unrolled_layers_equals_the_scanned_one(assert_close):
    """scan_layers=False (remat on, the scan kept in one layer of two) under FSDP x tensor
    against the scanned model on one device."""
    config = TrainConfig(steps=10, batch_size=8, seq_len=16, warmup_steps=1, lr=1e-2)
    ref_losses, ref_params, _ = _train(MeshConfig(data=1, fsdp=1, tensor=1), config, devices=1)
    unrolled = MODEL.replace(scan_layers=False, remat=True, remat_keep_scan=True,
                             remat_keep_scan_layers=1)  # fmt: skip
    losses, params, _ = _train(MeshConfig(2, 2, 2, 1), config, model=unrolled)
    assert_close(np.asarray(losses), np.asarray(ref_losses), err_msg="loss")
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params)
    ):
        assert_close(a, b, grad=True, err_msg=jax.tree_util.keystr(path))


def test_grad_accumulation_equals_one_big_batch(assert_close):
    base = dict(steps=10, batch_size=8, seq_len=16, warmup_steps=1, lr=1e-2)
    mesh = MeshConfig(data=2, fsdp=1, tensor=1)
    losses1, params1, _ = _train(mesh, TrainConfig(**base, grad_accum=1), devices=2)
    losses4, params4, _ = _train(mesh, TrainConfig(**base, grad_accum=4), devices=2)
    assert_close(np.asarray(losses4), np.asarray(losses1))
    for a, b in zip(jax.tree.leaves(params4), jax.tree.leaves(params1)):
        assert_close(a, b, grad=True)


_HLO_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def gathers(hlo: str) -> list[tuple[int, str]]:
    """(bytes, line) of every all-gather and all-to-all in compiled HLO text: the bytes of its
    result, one device's share (a tuple's parts summed)."""
    found = []
    for line in hlo.splitlines():
        match = re.search(r" = (.*?) (all-gather|all-to-all)(-done)?\(", line)
        if match:
            size = sum(
                _HLO_BYTES[t] * int(np.prod([int(d) for d in dims.split(",") if d]))
                for t, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
            )
            found.append((size, line.strip()[:160]))
    return found


@pytest.mark.parametrize("shape", [(1, 4, 2, 1), (1, 1, 1, 8)], ids=str)
def test_train_step_gathers_no_activations(shape):
    """The compiled step gathers parameters (FSDP) and the scan's small state exchange, never
    activations: no all-gather or all-to-all yields more than one device's (b, l, e) block (a
    gathered activation is several blocks; an all-to-all that re-lays out one device's (b, l, d)
    share, as the embedding lookup under FSDP does, is at most one). Without the shard_map
    around the scan (MAMBA_JAX_SHARD_MAP=0) XLA gathers the scan's operands whole and this
    fails on both meshes."""
    model = MambaConfig(d_model=64, n_layer=2, vocab_size=257, scan_impl="associative")
    batch, length = 8, 2048
    mesh = shd.make_mesh(MeshConfig(*shape))
    config = TrainConfig(steps=10, batch_size=batch, seq_len=length, warmup_steps=1)
    tx = trainer.make_optimizer(config)
    graphdef, abstract, shardings = trainer.train_state_shardings(model, tx, mesh)
    step = trainer.make_train_step(graphdef, tx, config, shardings, mesh)
    tokens = jax.ShapeDtypeStruct((batch, length), np.int32, sharding=shd.batch_sharding(mesh))
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    hlo = step.lower(state, {"inputs": tokens, "targets": tokens}).compile().as_text()
    data, fsdp, tensor, sequence = shape
    block = (batch // (data * fsdp)) * (length // sequence) * (model.d_inner // tensor) * 4
    found = gathers(hlo)
    assert found, "no collectives found: the HLO parser is out of date"
    too_big = [(size, line) for size, line in found if size > block]
    assert not too_big, f"activation-sized gathers (over {block} bytes): {too_big}"
