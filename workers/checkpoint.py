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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save files: never read, named in the error


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

    def check_fits(self, out: torch.Tensor) -> None:
        """CheckpointError unless `out` has this tensor's shape."""
        if tuple(out.shape) != self.shape:
            raise CheckpointError(f"{self.path}: tensor '{self.name}' has shape {self.shape}, expected {tuple(out.shape)}")

    def read_into(self, out: torch.Tensor) -> None:
        """Copies the tensor into `out` (same shape), converting dtype and device as needed."""
        self.check_fits(out)
        if out.dtype == self.dtype and out.device.type == "cpu" and out.is_contiguous():
            self._read_bytes(out)
        else:
            out.copy_(self.read())

    def _read_bytes(self, out: torch.Tensor) -> None:
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                got = f.readinto(buf) if buf is not None else 0
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read tensor '{self.name}' ({e.strerror})") from None
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
        self._check_index()

    def _files(self) -> list[Path]:
        self.index = self.dir / "model.safetensors.index.json"
        self.weight_map: dict[str, str] = {}  # tensor name -> file, as the index says
        if self.index.is_file():
            try:
                index = json.loads(self.index.read_text())
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.index}: not a valid safetensors index ({e})") from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{self.index}: not a valid safetensors index (it needs \"weight_map\": "
                                      "{tensor name: file name})")
            self.weight_map = weight_map
            files = sorted(set(weight_map.values()))
        elif (self.dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            if not self.dir.is_dir():
                raise CheckpointError(f"{self.dir}: model directory does not exist")
            pickles = sorted(p.name for p in self.dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
            found = f", not {', '.join(pickles)} (pickle can run code; convert it to safetensors)" if pickles else ""
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json; only "
                                  f"safetensors checkpoints are loaded{found}")
        paths = [self.dir / f for f in files]
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"{p}: listed in {self.index.name} but missing")
        return paths

    def _check_index(self) -> None:
        """Every tensor the index lists is in the file it names."""
        for name, file in self.weight_map.items():
            ref = self.tensors.get(name)
            if ref is None or ref.path.name != Path(file).name:
                raise CheckpointError(f"{self.dir / file}: has no tensor '{name}', which {self.index.name} "
                                      "says it holds (truncated or mismatched shard?)")

    def _read_header(self, path: Path) -> None:
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                raw = f.read(8)
                if len(raw) != 8:
                    raise CheckpointError(f"{path}: not a safetensors file (too short)")
                (n,) = struct.unpack("<Q", raw)
                if n > MAX_HEADER or n + 8 > size:
                    raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
                header = json.loads(f.read(n))
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read it ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
                start, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(d) for d in info["shape"])
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header at tensor '{name}' ({e!r})") from None
            if dtype is None:
                raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
            ref = TensorRef(name, path, base + start, dtype, shape, self)
            if min(shape, default=0) < 0 or end - start != ref.nbytes or start < 0 or base + end > size:
                raise CheckpointError(f"{path}: tensor '{name}' lies outside the file (truncated or corrupt)")
            self.tensors[name] = ref

    def names(self) -> list[str]:
        return list(self.tensors)

    def __getitem__(self, name: str) -> TensorRef:
        return self.tensors[name]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
