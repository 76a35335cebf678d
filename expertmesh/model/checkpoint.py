"""Reads tensors by name from a Hugging Face safetensors checkpoint (one file or an index of shards).

Only the tensors asked for are read from disk, so an expert node touches just its own experts."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(ValueError):
    """A tensor is missing from the checkpoint or has the wrong shape."""


class Checkpoint:
    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {str(self.model_dir)!r}")
            self._file_of = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    self._file_of.update({name: file for name in handle.keys()})
        self._handles: dict[Path, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
        """The tensor `name`, checked against the expected shape and converted to dtype on device."""
        if name not in self._file_of:
            raise CheckpointError(f"tensor {name!r} missing from checkpoint {str(self.model_dir)!r}")
        file = self._file_of[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        tensor = self._handles[file].get_tensor(name)  # type: ignore[attr-defined]
        if tuple(tensor.shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
        return tensor.to(device=device, dtype=dtype)
