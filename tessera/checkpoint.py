"""Model weights on disk: a Hugging Face-style directory with `config.json` and `model.safetensors`.

safetensors only — a checkpoint is data, never code, so nothing here unpickles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tessera.errors import CheckpointError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def tied_names(module: nn.Module) -> set[str]:
    """State-dict names that alias a tensor stored under an earlier name (tied embeddings): saved once."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        else:
            seen[id(tensor)] = name
    return tied


def save_weights(module: nn.Module, directory: Path) -> Path:
    skip = tied_names(module)
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items() if name not in skip}
    path = directory / WEIGHTS_NAME
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def load_weights(module: nn.Module, directory: Path) -> None:
    """Load `model.safetensors` strictly: every tensor present, none extra, every shape right."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected the model weights in safetensors format")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    expected = {name: t for name, t in module.state_dict().items() if name not in tied_names(module)}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing{more}; the config expects it")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}{more}; the config has no such weight")
    for name, want in expected.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {tuple(got.shape)}; the config expects {tuple(want.shape)}"
            )
    with torch.no_grad():
        module.load_state_dict(tensors, strict=False)  # tied aliases are filled through their source tensor
