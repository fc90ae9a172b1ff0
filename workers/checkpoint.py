"""Checkpoint: the tensors of a local HF safetensors checkpoint, read one at a time.

The index (`model.safetensors.index.json`, or a single `model.safetensors`) and each file's header are read up
front; tensor bytes are read only on request, with plain reads straight into the destination (no mmap, so the
pages of a whole shard never count against the process), and only for the tensors a rank owns.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A missing or corrupt checkpoint file; the message names the file."""


@dataclass(frozen=True)
class TensorRef:
    name: str
    path: Path
    offset: int  # absolute byte offset in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    checkpoint: "Checkpoint"

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n

    def read(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        self._read_bytes(out)
        return out

    def read_into(self, out: torch.Tensor) -> None:
        """Copies the tensor into `out` (same shape), converting dtype and device as needed."""
        if tuple(out.shape) != self.shape:
            raise CheckpointError(f"{self.path}: tensor '{self.name}' has shape {self.shape}, expected {tuple(out.shape)}")
        if out.dtype == self.dtype and out.device.type == "cpu" and out.is_contiguous():
            self._read_bytes(out)
        else:
            out.copy_(self.read())

    def _read_bytes(self, out: torch.Tensor) -> None:
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(buf) if buf is not None else 0
        if got != self.nbytes:
            raise CheckpointError(f"{self.path}: tensor '{self.name}' is truncated ({got} of {self.nbytes} bytes)")
        self.checkpoint.reads.append(self.name)


class Checkpoint:
    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.reads: list[str] = []  # names read so far, for tests and accounting
        self.tensors: dict[str, TensorRef] = {}
        for path in self._files():
            self._read_header(path)

    def _files(self) -> list[Path]:
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            if not self.dir.is_dir():
                raise CheckpointError(f"{self.dir}: model directory does not exist")
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json "
                                  "(only safetensors checkpoints are loaded)")
        paths = [self.dir / f for f in files]
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"{p}: listed in the index but missing")
        return paths

    def _read_header(self, path: Path) -> None:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or n + 8 > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
            start, end = info["data_offsets"]
            ref = TensorRef(name, path, base + start, dtype, tuple(info["shape"]), self)
            if end - start != ref.nbytes or base + end > size:
                raise CheckpointError(f"{path}: tensor '{name}' lies outside the file (truncated or corrupt)")
            self.tensors[name] = ref

    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
