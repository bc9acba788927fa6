"""Name maps between tessera's state dict and a Hugging Face checkpoint.

A `Rule` says which Hugging Face tensors make up one tessera tensor. Most rules are one-to-one renames; a few
concatenate (tessera fuses q/k/v and gate/up into one matmul) or reshape (CLIP's CLS vector is tessera's
(1, 1, D) token). Both directions use the same rule: import concatenates the flattened pieces and reshapes to
tessera's shape; export flattens tessera's tensor and splits it back into the pieces' shapes. Every Hugging Face
tensor's shape is checked against the one its config implies, so a wrong-shaped tensor is named, never loaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from tessera.checkpoint import assign_weights, tied_names
from tessera.errors import CheckpointError
from tessera.interop.hub_files import WeightFiles

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Rule:
    ours: str  # tessera state-dict name
    theirs: tuple[tuple[str, Shape], ...]  # Hugging Face names and the shapes their config implies


def rename(ours: str, theirs: str, shape: Shape) -> Rule:
    return Rule(ours, ((theirs, tuple(shape)),))


def fuse(ours: str, *theirs: tuple[str, Shape]) -> Rule:
    return Rule(ours, tuple((name, tuple(shape)) for name, shape in theirs))


def linear(ours: str, theirs: str, out_features: int, in_features: int, bias: bool) -> list[Rule]:
    rules = [rename(f"{ours}.weight", f"{theirs}.weight", (out_features, in_features))]
    if bias:
        rules.append(rename(f"{ours}.bias", f"{theirs}.bias", (out_features,)))
    return rules


def norm(ours: str, theirs: str, width: int, bias: bool = True) -> list[Rule]:
    """A LayerNorm (weight + bias) or, with bias=False, an RMSNorm."""
    rules = [rename(f"{ours}.weight", f"{theirs}.weight", (width,))]
    if bias:
        rules.append(rename(f"{ours}.bias", f"{theirs}.bias", (width,)))
    return rules


def rename_keys(names: list[str], patterns: list[tuple[str, str]]) -> dict[str, str]:
    """{name in the file: name in transformers' current layout}: the first matching (regex, replacement) applied,
    like transformers' conversion mapping."""
    out = {}
    for stored in names:
        name = stored
        for pattern, replacement in patterns:
            if re.search(pattern, name):
                name = re.sub(pattern, replacement, name)
                break
        out[stored] = name
    return out


def import_weights(model: nn.Module, rules: Iterable[Rule], tensors: dict[str, torch.Tensor], source: WeightFiles,
                   ignored: Iterable[str] = (), dtype: torch.dtype | None = None, assign: bool = False,
                   stored_names: dict[str, str] | None = None) -> None:
    """Fill `model` from Hugging Face `tensors`: every tessera tensor from its rule, every Hugging Face tensor used
    or explicitly ignored, every shape as the config says. Errors name the file and the tensor.

    `tensors` is consumed (each entry dropped once used) so a large checkpoint is never held twice; with
    assign=True the model's (meta) parameters are replaced by the loaded tensors instead of copied into.
    stored_names maps a tensor's current-layout name to the one in the file, for error messages."""
    stored = stored_names or {}
    rules = list(rules)
    ours = {name: t for name, t in model.state_dict().items() if name not in tied_names(model)}
    missing_rules = sorted(set(ours) - {rule.ours for rule in rules})
    if missing_rules:  # a bug in a name map, not in the user's checkpoint
        raise AssertionError(f"no name-map rule fills tessera tensor {missing_rules[0]!r}")
    for name in ignored:
        tensors.pop(name, None)
    loaded = {}
    for rule in rules:
        pieces = []
        for name, shape in rule.theirs:
            if name not in tensors:
                raise CheckpointError(f"{source}: tensor {name!r} is missing; config.json implies it")
            if tuple(tensors[name].shape) != shape:
                as_stored = stored.get(name, name)
                raise CheckpointError(f"{source.of(as_stored)}: tensor {as_stored!r} has shape "
                                      f"{tuple(tensors[name].shape)}; config.json implies {shape}")
            pieces.append(tensors.pop(name).reshape(-1))
        target = ours[rule.ours]
        joined = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        # a copy even in the stored dtype: with assign=True a tensor mapping the file would become the parameter
        loaded[rule.ours] = joined.reshape(target.shape).to(dtype or target.dtype, copy=len(pieces) == 1)
    if tensors:
        unexpected = sorted(tensors, key=lambda name: stored.get(name, name))
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        first = stored.get(unexpected[0], unexpected[0])  # as the file names it
        raise CheckpointError(f"{source.of(first)}: unexpected tensor {first!r}{more}; tessera has no place for it "
                              f"in this architecture")
    if assign:
        assign_weights(model, loaded)
    else:
        with torch.no_grad():
            model.load_state_dict(loaded, strict=False)  # tied aliases are filled through their source


def export_weights(state: dict[str, torch.Tensor], rules: Iterable[Rule]) -> dict[str, torch.Tensor]:
    """tessera's state dict → Hugging Face tensors, split and reshaped by the same rules as `import_weights`."""
    out = {}
    for rule in rules:
        flat = state[rule.ours].detach().reshape(-1)
        sizes = [math.prod(shape) for _, shape in rule.theirs]
        if sum(sizes) != flat.numel():
            raise AssertionError(f"name-map rule for {rule.ours!r} covers {sum(sizes)} values of {flat.numel()}")
        for (name, shape), piece in zip(rule.theirs, flat.split(sizes)):
            out[name] = piece.reshape(shape).clone()
    return out
