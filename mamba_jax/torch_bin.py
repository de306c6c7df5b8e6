"""Reads PyTorch `.bin` state dicts without executing anything but tensor reconstruction.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle whose tensors point at raw storages
in `<name>/data/<key>`. Unpickling runs whatever callables the pickle names, so a checkpoint from
elsewhere is untrusted code. With torch installed, `torch.load(weights_only=True)` restricts it;
without torch, `_TensorOnlyUnpickler` allows only the tensor-rebuilding globals and builds numpy
arrays, checking every view against its storage. Anything else is refused, never called.
"""

from __future__ import annotations

import pickle
import zipfile

import ml_dtypes
import numpy as np


class _Refused(pickle.UnpicklingError):
    pass


_STORAGES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}  # fmt: skip


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    # as_strided does no bounds checks, so an untrusted view must be proven inside its storage.
    ok = (
        len(size) == len(stride)
        and offset >= 0
        and all(n >= 0 and s >= 0 for n, s in zip(size, stride))
    )
    last = (
        offset + sum((n - 1) * s for n, s in zip(size, stride)) if ok and 0 not in size else offset
    )
    if not ok or (0 not in size and last >= storage.size):
        raise _Refused(f"tensor view (offset {offset}, size {size}, stride {stride}) out of bounds")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
    )
    return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_parameter(data, *_):
    return data


class _TensorOnlyUnpickler(pickle.Unpickler):
    """Rebuilds PyTorch's zip pickle as numpy arrays; any other global is refused unexecuted."""

    _ALLOWED = {
        ("collections", "OrderedDict"): dict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix, self._storages = archive, prefix, {}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGES:
            return _StorageType(_STORAGES[name])
        raise _Refused(f"global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise _Refused(f"persistent id {pid!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType):
            raise _Refused(f"storage type {kind!r}")
        if key not in self._storages:
            raw = self._archive.read(f"{self._prefix}/data/{key}")
            self._storages[key] = np.frombuffer(raw, dtype=kind.dtype, count=int(numel))
        return self._storages[key]


def read_torch_bin(path: str, use_torch: bool | None = None) -> dict[str, np.ndarray]:
    """A PyTorch `.bin` state dict -> {key: array}, refusing anything but tensors.

    use_torch None: `torch.load(weights_only=True)` when torch is importable, else a tensor-only
    unpickler over the zip archive (the format torch.save has written since 1.6)."""
    if use_torch is None:
        try:
            import torch  # noqa: F401

            use_torch = True
        except ImportError:
            use_torch = False
    refusal = (
        f"{path} holds more than tensors (or is not a PyTorch zip checkpoint); it is refused "
        "because unpickling it could run arbitrary code. Convert it to safetensors instead."
    )
    if not zipfile.is_zipfile(path):  # the pre-1.6 format: a bare pickle stream
        raise ValueError(refusal)
    if use_torch:
        import torch

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{refusal} ({err})") from None
        except RuntimeError as err:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from None
        out = {}
        for k, v in sd.items() if isinstance(sd, dict) else ():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
            v = v.detach().contiguous()
            if v.dtype == torch.bfloat16:  # numpy has no bf16: move the bits unchanged
                out[k] = v.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                out[k] = v.numpy()
    else:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise ValueError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
            prefix = pkl[0][: -len("/data.pkl")]
            byteorder = f"{prefix}/byteorder"
            if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
                raise ValueError(f"{path}: big-endian checkpoints are not supported")
            with archive.open(pkl[0]) as f:
                try:
                    sd = _TensorOnlyUnpickler(f, archive, prefix).load()
                except _Refused as err:
                    raise ValueError(f"{refusal} (found {err})") from None
                except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}: malformed checkpoint pickle ({err})") from None
        out = sd if isinstance(sd, dict) else {}
    if not isinstance(sd, dict) or not all(isinstance(v, np.ndarray) for v in out.values()):
        raise ValueError(f"{path} must hold a dict of tensors (a state dict)")
    return out
