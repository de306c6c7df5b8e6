"""Load and save Mamba-1 checkpoints: transformers' MambaForCausalLM (HF) and mamba_ssm's layout.

A checkpoint directory holds `config.json` and the weights as `model.safetensors`, sharded
safetensors with `model.safetensors.index.json`, `pytorch_model.bin` or a sharded `.bin` index.

    HF key (prefix backbone.)         PyTorch shape       ours (per layer, stacked on axis 0)
    embeddings.weight                 (v, d)              embedding.embedding (v_pad, d), zero rows
    layers.{i}.norm.weight            (d,)                layers.norm.weight
    layers.{i}.mixer.in_proj.weight   (2e, d)             layers.mixer.in_proj.kernel (d, 2e)
    layers.{i}.mixer.conv1d.weight    (e, 1, w)           layers.mixer.conv1d.kernel (w, e)
    layers.{i}.mixer.x_proj.weight    (r + 2n, e)         layers.mixer.x_proj.kernel (e, r + 2n)
    layers.{i}.mixer.dt_proj.weight   (e, r)              layers.mixer.dt_proj.kernel (r, e)
    layers.{i}.mixer.out_proj.weight  (d, e)              layers.mixer.out_proj.kernel (e, d)
    (biases, A_log (e, n) and D (e,) keep their shapes)   norm_f.weight (d,)

mamba_ssm's original checkpoints say `backbone.embedding.weight` (already padded to a multiple
of 8) and describe the model with d_model/n_layer/ssm_cfg. `lm_head.weight`, when present, must
equal the embedding: the model's head is tied.

Checkpoints are untrusted input: `.bin` files are read with `torch.load(weights_only=True)`, or
without torch by a reader that accepts tensors and nothing else (`torch_bin.read_torch_bin`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLM, abstract_model
from mamba_jax.torch_bin import read_torch_bin

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
_DTYPES = ("float32", "bfloat16", "float16")
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}

# Our per-layer parameter path -> (HF key suffix after `backbone.layers.{i}.`, layout).
_LAYER_KEYS = {
    ("norm", "weight"): ("norm.weight", "copy"),
    ("mixer", "in_proj", "kernel"): ("mixer.in_proj.weight", "linear"),
    ("mixer", "in_proj", "bias"): ("mixer.in_proj.bias", "copy"),
    ("mixer", "conv1d", "kernel"): ("mixer.conv1d.weight", "conv"),
    ("mixer", "conv1d", "bias"): ("mixer.conv1d.bias", "copy"),
    ("mixer", "x_proj", "kernel"): ("mixer.x_proj.weight", "linear"),
    ("mixer", "dt_proj", "kernel"): ("mixer.dt_proj.weight", "linear"),
    ("mixer", "dt_proj", "bias"): ("mixer.dt_proj.bias", "copy"),
    ("mixer", "A_log"): ("mixer.A_log", "copy"),
    ("mixer", "D"): ("mixer.D", "copy"),
    ("mixer", "out_proj", "kernel"): ("mixer.out_proj.weight", "linear"),
    ("mixer", "out_proj", "bias"): ("mixer.out_proj.bias", "copy"),
}


def _get(raw: dict, key: str, source: str, default=...):
    if key in raw:
        return raw[key]
    if default is ...:
        raise ValueError(f"{source} is missing the field {key!r}")
    return default


def _rank(value):
    return None if value in (None, "auto") else int(value)


def config_from_hf_dict(raw: dict, source: str = "config.json") -> tuple[MambaConfig, str]:
    """HF (hidden_size/num_hidden_layers/state_size) or mamba_ssm (d_model/n_layer/ssm_cfg) config.

    Returns (config, "hf" | "original"). Refuses what the model cannot express."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    if "hidden_size" in raw or raw.get("model_type") is not None:
        if raw.get("model_type", "mamba") != "mamba":
            raise ValueError(f"{source}: model_type must be 'mamba', got {raw['model_type']!r}")
        if raw.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act must be 'silu', got {raw['hidden_act']!r}")
        if not raw.get("tie_word_embeddings", True):
            raise ValueError(f"{source}: tie_word_embeddings=false is not supported (tied head)")
        config = MambaConfig(
            d_model=_get(raw, "hidden_size", source),
            n_layer=_get(raw, "num_hidden_layers", source),
            vocab_size=_get(raw, "vocab_size", source),
            d_state=raw.get("state_size", 16),
            d_conv=raw.get("conv_kernel", 4),
            expand=raw.get("expand", 2),
            dt_rank_=_rank(raw.get("time_step_rank")),
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            bias=bool(raw.get("use_bias", False)),
            conv_bias=bool(raw.get("use_conv_bias", True)),
            dt_min=raw.get("time_step_min", 1e-3),
            dt_max=raw.get("time_step_max", 1e-1),
            dt_init_floor=raw.get("time_step_floor", 1e-4),
        )
        inner = raw.get("intermediate_size")
        if inner is not None and inner != config.d_inner:
            raise ValueError(
                f"{source}: intermediate_size={inner} must equal expand * hidden_size = "
                f"{config.d_inner}"
            )
        return config, "hf"
    if "d_model" in raw:
        ssm = raw.get("ssm_cfg") or {}
        if ssm.get("layer", "Mamba1") != "Mamba1":
            raise ValueError(f"{source}: only Mamba1 layers are supported, got {ssm['layer']!r}")
        if raw.get("attn_layer_idx") or raw.get("d_intermediate", 0):
            raise ValueError(
                f"{source}: attention layers and MLPs (hybrid models) are not supported"
            )
        if not raw.get("rms_norm", True):
            raise ValueError(f"{source}: rms_norm=false (LayerNorm) is not supported")
        if not raw.get("tie_embeddings", True):
            raise ValueError(f"{source}: tie_embeddings=false is not supported (tied head)")
        config = MambaConfig(
            d_model=_get(raw, "d_model", source),
            n_layer=_get(raw, "n_layer", source),
            vocab_size=_get(raw, "vocab_size", source),
            d_state=ssm.get("d_state", 16),
            d_conv=ssm.get("d_conv", 4),
            expand=ssm.get("expand", 2),
            dt_rank_=_rank(ssm.get("dt_rank")),
            norm_eps=raw.get("norm_epsilon", 1e-5),
            bias=bool(ssm.get("bias", False)),
            conv_bias=bool(ssm.get("conv_bias", True)),
            dt_min=ssm.get("dt_min", 1e-3),
            dt_max=ssm.get("dt_max", 1e-1),
            dt_init_floor=ssm.get("dt_init_floor", 1e-4),
            pad_vocab_size_multiple=raw.get("pad_vocab_size_multiple", 8),
        )
        return config, "original"
    raise ValueError(
        f"{source} is neither an HF Mamba config (hidden_size, num_hidden_layers, vocab_size) nor "
        f"a mamba_ssm config (d_model, n_layer, vocab_size); found keys {sorted(raw)[:12]}"
    )


def config_to_hf_dict(config: MambaConfig) -> dict:
    """transformers' MambaConfig field names; `dtype` names the stored weights' dtype.

    rescale_prenorm_residual is an initialisation setting, but transformers 5.23 applies it to
    loaded weights too (out_proj / sqrt(n_layer)), so the export always says false."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "conv_kernel": config.d_conv,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "time_step_rank": config.dt_rank,
        "layer_norm_epsilon": config.norm_eps,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "time_step_scale": 1.0,
        "time_step_init_scheme": "random",
        "rescale_prenorm_residual": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "dtype": config.param_dtype,
    }


class _Reader:
    """key -> (shape, dtype) and `read(key, index)`, lazily for safetensors."""

    def __init__(self, directory: str):
        names = set(os.listdir(directory))
        fmt = next((f for f in WEIGHT_FILES if f in names), None)
        if fmt is None:
            raise ValueError(
                f"{directory} holds no weights: expected one of {', '.join(WEIGHT_FILES)}"
            )
        self.source = os.path.join(directory, fmt)
        if fmt.endswith(".index.json"):
            files = self._index(directory, fmt)
        else:
            files = {None: os.path.join(directory, fmt)}
        self._arrays, self._slices, self.meta = {}, {}, {}
        for file in sorted(set(files.values())):
            if file.endswith(".safetensors"):
                self._open_safetensors(file)
            else:
                for key, arr in read_torch_bin(file).items():
                    self._arrays[key] = arr
                    self.meta[key] = (tuple(arr.shape), arr.dtype, file)

    def _index(self, directory, name):
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path} must be JSON with a 'weight_map' object ({err})") from None
        files = {}
        for key, file in weight_map.items():
            # The index is untrusted: a shard name may not leave the directory.
            plain = (
                isinstance(file, str) and file not in (".", "..") and os.path.basename(file) == file
            )
            if not plain or not file:
                raise ValueError(
                    f"{path}: shard name {file!r} for {key!r} must be a plain file name"
                )
            full = os.path.join(directory, file)
            if not os.path.isfile(full):
                raise ValueError(f"{path} names the shard {file!r}, which does not exist")
            files[key] = full
        return files

    def _open_safetensors(self, file):
        from safetensors import SafetensorError, safe_open

        try:
            handle = safe_open(file, framework="np")
            for key in handle.keys():
                sl = handle.get_slice(key)
                dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype())  # a name if not a float
                self._slices[key] = sl
                self.meta[key] = (tuple(sl.get_shape()), dtype, file)
        except (SafetensorError, OSError, TypeError) as err:
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None

    def keys(self):
        return self.meta.keys()

    def read(self, key, index=None):
        """The array under `key`, or only `index` (a tuple of slices) of it."""
        if key in self._slices:
            sl = self._slices[key]
            return np.asarray(sl[index] if index else sl[:])
        arr = self._arrays[key]
        return arr[index] if index else arr


def dtype_name(dtype) -> str:
    """ "float32", "bfloat16" or "float16" from any spelling jnp.dtype takes; else ValueError."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES} (or None), got {dtype!r}")
    return name


# Our per-layer shape -> the PyTorch shape the checkpoint stores, and our array -> PyTorch's.
_TORCH_SHAPE = {
    "copy": tuple,
    "linear": lambda s: tuple(s[::-1]),
    "conv": lambda s: (s[1], 1, s[0]),
}
_TO_TORCH = {"copy": lambda a: a, "linear": lambda a: a.T, "conv": lambda a: a.T[:, None, :]}


def _read_layout(reader, key, index, layout):
    """Reads `index` of our layout from the PyTorch-layout tensor `key`."""
    if layout == "linear":  # ours (in, out) = torch (out, in).T
        return reader.read(key, (index[1], index[0])).T
    if layout == "conv":  # ours (w, e) = torch (e, 1, w)[:, 0].T
        return reader.read(key, (index[1], slice(None), index[0]))[:, 0, :].T
    return reader.read(key, index)


class _Plan:
    """How to read each of the model's parameters from a checkpoint, validated up front."""

    def __init__(self, config: MambaConfig, reader: _Reader, flat_paths, source: str):
        self.config, self.reader, self.source = config, reader, source
        keys = set(reader.keys())
        self.emb_key = next(
            (k for k in ("backbone.embeddings.weight", "backbone.embedding.weight") if k in keys),
            "backbone.embeddings.weight",
        )
        self.readers, used = {}, {self.emb_key, "lm_head.weight"}
        for path, shape in flat_paths:
            self.readers[path], names = self._plan(path, shape)
            used.update(names)
        extra = sorted(keys - used)
        if extra:
            raise ValueError(
                f"{source} has keys this Mamba-1 model does not use: {extra[:6]}"
                f"{' ...' if len(extra) > 6 else ''} (is it another architecture, or untied?)"
            )
        if "lm_head.weight" in keys:
            self._check_tied()

    def _expect(self, key, shape):
        if key not in self.reader.meta:
            raise ValueError(f"{self.source} is missing the key {key!r}")
        got, dtype, _ = self.reader.meta[key]
        if got != tuple(shape):
            raise ValueError(f"{self.source}: {key!r} must have shape {tuple(shape)}, got {got}")
        if str(dtype) not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"{self.source}: {key!r} must be a float tensor, got {dtype}")

    def _plan(self, path, shape):
        c = self.config
        if path == ("embedding", "embedding"):
            if self.emb_key not in self.reader.meta:
                raise ValueError(f"{self.source} is missing the key {self.emb_key!r}")
            self._expect(self.emb_key, self.reader.meta[self.emb_key][0])
            rows = self.reader.meta[self.emb_key][0]
            if len(rows) != 2 or rows[1] != c.d_model or rows[0] not in {c.vocab_size, shape[0]}:
                raise ValueError(
                    f"{self.source}: {self.emb_key!r} must have shape ({c.vocab_size} or "
                    f"{shape[0]}, {c.d_model}), got {rows}"
                )
            return self._read_embedding, [self.emb_key]
        if path == ("norm_f", "weight"):
            self._expect("backbone.norm_f.weight", shape)
            key = "backbone.norm_f.weight"
            return (lambda index: self.reader.read(key, index)), [key]
        if path[0] != "layers" or path[1:] not in _LAYER_KEYS:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no checkpoint key")
        suffix, layout = _LAYER_KEYS[path[1:]]
        names = [f"backbone.layers.{i}.{suffix}" for i in range(shape[0])]
        for name in names:
            self._expect(name, _TORCH_SHAPE[layout](shape[1:]))

        def read(index):
            layers = range(shape[0])[index[0]]
            parts = [_read_layout(self.reader, names[i], index[1:], layout) for i in layers]
            return np.stack(parts)

        return read, names

    def _read_embedding(self, index):
        """Rows past the stored vocab are padding: zeros, so they never win an argmax."""
        rows, cols = index
        v_pad = self.config.padded_vocab_size
        start, stop, _ = rows.indices(v_pad)
        stored = self.reader.meta[self.emb_key][0][0]
        top = self.reader.read(self.emb_key, (slice(start, min(stop, stored)), cols))
        pad = np.zeros((stop - start - top.shape[0], top.shape[1]), top.dtype)
        return np.concatenate([top, pad]) if pad.shape[0] else top

    def _check_tied(self, chunk=4096):
        shape = self.reader.meta["lm_head.weight"][0]
        stored = self.reader.meta[self.emb_key][0]
        if len(shape) != 2 or shape[1] != stored[1] or shape[0] < self.config.vocab_size:
            raise ValueError(
                f"{self.source}: 'lm_head.weight' has shape {shape}, expected {stored}"
            )
        # Only the real vocab's rows matter: padded rows are never sampled.
        for start in range(0, self.config.vocab_size, chunk):
            rows = (slice(start, min(start + chunk, self.config.vocab_size)),)
            if not np.array_equal(
                self.reader.read("lm_head.weight", rows), self.reader.read(self.emb_key, rows)
            ):
                raise ValueError(
                    f"{self.source}: 'lm_head.weight' differs from the embedding; only tied "
                    "heads are supported"
                )


def read_hf_config(path: str) -> tuple[MambaConfig, str]:
    """`path/config.json` -> (MambaConfig, "hf" | "original")."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path} has no config.json (expected an HF or mamba_ssm checkpoint)")
    try:
        with open(file) as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    return config_from_hf_dict(raw, file)


def is_pretrained_dir(path: str) -> bool:
    """True when `path` looks like an HF / mamba_ssm checkpoint (config.json and weights)."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, f)) for f in WEIGHT_FILES
    )


def load_pretrained(path, dtype=None, mesh=None) -> MambaLM:
    """Loads an HF (state-spaces/mamba-*-hf) or original mamba_ssm checkpoint directory.

    dtype: the parameters' and activations' dtype (float32, bfloat16, float16); None keeps the
        checkpoint's. A_log, D and the dt bias stay float32 whatever it says.
    mesh: with a `jax.sharding.Mesh`, each parameter is assembled shard by shard from the file
        (`jax.make_array_from_callback`) with the placement of `mamba_jax.sharding`'s rules, so the
        whole model is never held on one device.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path must be a checkpoint directory, got {path!r}")
    config, _ = read_hf_config(path)
    reader = _Reader(path)
    emb = reader.meta.get("backbone.embeddings.weight") or reader.meta.get(
        "backbone.embedding.weight"
    )
    if dtype is None:
        stored = str(emb[1]) if emb is not None else "float32"
        name = stored if stored in _DTYPES else "float32"
    else:
        name = dtype_name(dtype)
    config = config.replace(dtype=name, param_dtype=name)

    graphdef, abstract_state = nnx.split(abstract_model(config))
    flat = list(nnx.to_flat_state(abstract_state))
    plan = _Plan(config, reader, [(p, tuple(v.shape)) for p, v in flat], reader.source)

    leaves = []
    for p, var in flat:
        read, shape, dtype_ = plan.readers[p], tuple(var.shape), var.dtype
        if mesh is None:
            value = jnp.asarray(read(tuple(slice(None) for _ in shape)).astype(dtype_))
        else:
            sharding = jax.sharding.NamedSharding(mesh, _spec(var, mesh))
            value = jax.make_array_from_callback(
                shape, sharding, lambda index, read=read, dt=dtype_: read(index).astype(dt)
            )
        leaves.append((p, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _spec(var, mesh):
    from mamba_jax.sharding import logical_to_spec

    names = var.get_metadata().get("out_sharding")
    try:
        return logical_to_spec(names, tuple(var.shape), mesh)
    except KeyError as err:
        raise ValueError(
            f"mesh must have the axes ('data', 'fsdp', 'tensor'), got {mesh.axis_names} ({err})"
        ) from None


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def hf_state_dict(model: MambaLM) -> dict[str, np.ndarray]:
    """The model's parameters under transformers' keys and PyTorch layouts (vocab unpadded)."""
    c = model.config
    if not c.selective:
        raise ValueError("a model with config.selective=False (LTI ablation) has no HF equivalent")
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = _to_host(var.get_value())
        if path == ("embedding", "embedding"):
            out["backbone.embeddings.weight"] = arr[: c.vocab_size]
        elif path == ("norm_f", "weight"):
            out["backbone.norm_f.weight"] = arr
        elif path[0] == "layers" and path[1:] in _LAYER_KEYS:
            suffix, layout = _LAYER_KEYS[path[1:]]
            for i in range(arr.shape[0]):
                out[f"backbone.layers.{i}.{suffix}"] = _TO_TORCH[layout](arr[i])
        else:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no HF key")
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def save_pretrained(model: MambaLM, path) -> None:
    """Writes `path/config.json` and `path/model.safetensors` in transformers' Mamba format.

    The head stays tied (no `lm_head.weight` is written, as transformers does); the embedding is
    cut back from padded_vocab_size to vocab_size rows. Every process gathers; process 0 writes."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tensors = hf_state_dict(model)
    if jax.process_index() != 0:
        return
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf_dict(model.config), f, indent=2)
    save_file(tensors, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
