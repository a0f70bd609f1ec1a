"""Reading reference checkpoints from files into `{name: numpy array}`, without torch unless asked.

- `.safetensors`: read here from the format's specification (an 8-byte little-endian header length, a JSON header
  of `{name: {dtype, shape, data_offsets}}`, then the raw little-endian bytes), memory-mapped, so no extra
  dependency; bfloat16 and float8 arrays come back as `ml_dtypes` arrays.
- `.npz`: `numpy.load` without pickles.
- torch pickles (`.pth`, `.pt`, `.bin`, `.ckpt`): unpickling runs arbitrary code, so they load only with
  `allow_pickle=True`, which imports torch (the caller's installation; never a dependency of this package).
  Wrapped checkpoints (`{"model": state_dict, ...}`, `{"state_dict": ...}`, as training scripts save them) are
  unwrapped.
"""
from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2, "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U64": "<u8",
    "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")


def read_state_dict(source, *, allow_pickle: bool = False) -> Mapping[str, np.ndarray]:
    """`source`: a mapping (returned as is) or the path of a `.safetensors`, `.npz` or (with `allow_pickle=True`)
    torch checkpoint. Raises `FileNotFoundError` for a missing file and `ValueError` for an unknown or
    unreadable format."""
    if isinstance(source, Mapping):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"a state dict must be a mapping of names to arrays or a file path, got "
                         f"{type(source).__name__}")
    path = pathlib.Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist"
                                + (" (it is a directory)" if path.is_dir() else ""))
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors(path)
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except ValueError as e:  # object arrays need pickles
            raise ValueError(f"{str(path)!r}: cannot read the .npz without pickles ({e})") from None
    if suffix in TORCH_SUFFIXES:
        if not allow_pickle:
            raise ValueError(f"{str(path)!r} is a torch pickle ({suffix}): unpickling can run arbitrary code, so it "
                             f"loads only with allow_pickle=True (which imports torch); or save it as .safetensors")
        return _read_torch(path)
    raise ValueError(f"{str(path)!r}: unknown checkpoint format {suffix or '(no suffix)'!r}; known: .safetensors, "
                     f".npz, and {', '.join(TORCH_SUFFIXES)} with allow_pickle=True")


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a `.safetensors` file, as read-only memory-mapped numpy arrays."""
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{str(path)!r}: not a safetensors file (shorter than its 8-byte header length)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise ValueError(f"{str(path)!r}: not a safetensors file (header length {header_len} > file size)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(path)!r}: not a safetensors file (header is not JSON: {e})") from None
    start = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(size - start,)) if size > start else None
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{str(path)!r}: tensor {name!r} has unsupported dtype {dtype!r}")
        dt = np.dtype(SAFETENSORS_DTYPES[dtype])
        if end - begin != int(np.prod(shape)) * dt.itemsize or end > size - start:
            raise ValueError(f"{str(path)!r}: tensor {name!r} ({dtype} {list(shape)}) has data offsets "
                             f"[{begin}, {end}] that do not fit it or the file (truncated?)")
        out[name] = (data[begin:end].view(dt) if end > begin else np.zeros(0, dt)).reshape(shape)
    return out


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {str(path)!r} needs torch, which is not installed ({e})") from None
    obj = torch.load(path, map_location="cpu", weights_only=False)
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
        if not wrapped:
            raise ValueError(f"{str(path)!r}: no state dict found (top-level keys {sorted(map(str, obj))[:10]})")
        obj = obj[wrapped[0]]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{str(path)!r}: state-dict entry {name!r} is a {type(value).__name__}, not a tensor")
        value = value.detach().cpu()
        out[name] = (value.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
                     else value.numpy())
    return out
