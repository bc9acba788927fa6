"""The files of a Hugging Face checkpoint directory: config.json, safetensors weights (one file, or shards listed
in model.safetensors.index.json) and the JSON settings beside them.

safetensors only: a `pytorch_model.bin` is a pickle, and tessera never unpickles.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tessera.checkpoint import read_json_object, write_whole
from tessera.config import is_integer, is_number
from tessera.errors import CheckpointError, ConfigError

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size

# the kinds of value a config.json key may hold (a key's kinds are a tuple of these)
POSITIVE, INTEGER, NUMBER, FLAG, TEXT, INTEGERS, LIST, OBJECT, NULL = (
    "a positive integer", "an integer", "a number", "true or false", "a string", "a list of integers", "a list",
    "an object", "null")
HOLDS = {
    POSITIVE: lambda v: is_integer(v) and v > 0, INTEGER: is_integer, NUMBER: is_number,
    FLAG: lambda v: isinstance(v, bool), TEXT: lambda v: isinstance(v, str),
    INTEGERS: lambda v: isinstance(v, list) and all(map(is_integer, v)), LIST: lambda v: isinstance(v, list),
    OBJECT: lambda v: isinstance(v, dict), NULL: lambda v: v is None,
}


def read_json(path: Path, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: no such file")
        return None
    return read_json_object(path)


def checked(values: Any, kinds: dict[str, tuple[str, ...]], where: str) -> dict[str, Any]:
    """`values`, an object of a config file (null: an empty one), whose keys listed in `kinds` each hold one of their
    kinds. Checked on reading so that "512" or [512] where a number belongs is named by its key path in the file,
    not met later as a TypeError, under tessera's own field name, or ("false" being truthy) not at all."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected an object, got {type(values).__name__}")
    for key, allowed in kinds.items():
        if key in values and not any(HOLDS[kind](values[key]) for kind in allowed):
            raise ConfigError(f"{where}.{key}={values[key]!r}: expected {' or '.join(allowed)}")
    return values


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_whole(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def is_hf_checkpoint(directory: str | Path) -> bool:
    """A transformers config names its class ("architectures") or family ("model_type"); tessera's does not."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no file, or no JSON (read_json says which, where it is read)
        return False
    return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


@dataclass(frozen=True)
class WeightFiles:
    """Where a checkpoint's tensors were read from, for error messages: one file, or an index and its shards (a
    tensor's fault is named in the shard holding it, not only in the index)."""
    path: str  # model.safetensors, or the index
    shards: dict[str, str] = field(default_factory=dict)  # tensor name → its shard's path

    def of(self, name: str) -> str:
        return self.shards.get(name, self.path)

    def __str__(self) -> str:
        return self.path


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], WeightFiles]:
    """Every tensor of the checkpoint, and where they came from."""
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return _load(single), WeightFiles(str(single))
    if index.is_file():
        weight_map = (read_json(index) or {}).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map'; expected tensor name → shard file")
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or not shard:
                raise CheckpointError(f"{index}: weight_map[{name!r}]={shard!r}; expected a shard file name")
        tensors: dict[str, torch.Tensor] = {}
        shards: dict[str, str] = {}
        for shard in sorted(set(weight_map.values())):
            path = directory / shard
            if not path.is_file():
                raise CheckpointError(f"{path}: missing shard; {index.name} lists it")
            loaded = _load(path)
            shards.update(dict.fromkeys(loaded, str(path)))
            tensors.update(loaded)
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but in no shard")
        return tensors, WeightFiles(str(index), shards)
    if (directory / "pytorch_model.bin").is_file() or list(directory.glob("pytorch_model-*.bin")):
        raise CheckpointError(f"{directory}: only pickle weights (pytorch_model*.bin); tessera reads safetensors "
                              f"only — convert them with transformers' save_pretrained(safe_serialization=True)")
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}; expected safetensors weights")


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


# what --overwrite may delete: the files a checkpoint directory holds (tessera's, transformers', the Hub's)
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "tokenizer.model", "README.md", ".gitattributes")
STAGING = ".tessera-writing"  # inside the output directory: it works where the directory is a mount point too


@contextmanager
def output_directory(out: str | Path, source: str | Path, verb: str, overwrite: bool = False):
    """Yields an empty directory to write the `verb` (converted, exported) copy of `source` into; its files take
    their places in `out` only once all are written, so a write stopped half-way leaves `out` as it was. `out` must
    be new or empty: written into file by file, a directory holding another model kept its files where the new
    model wrote none (its chat template, shards of another index, …). `overwrite` replaces another checkpoint:
    a directory holding a config.json and only the kinds of file a checkpoint holds (CHECKPOINT_FILES), so that
    a mistyped path (`.`, a run's output, one's documents) loses nothing."""
    out = Path(out)
    if out.exists() and out.resolve() == Path(source).resolve():
        raise ConfigError(f"{out}: is the checkpoint being {verb}; expected another output directory")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file; expected a directory (made if missing)")
    held = sorted(path for path in out.iterdir() if path.name != STAGING) if out.is_dir() else []
    if held and not overwrite:
        raise ConfigError(f"{out}: holds {_listing(held)}; expected a new or empty directory, or --overwrite to "
                          f"replace the checkpoint it holds")
    others = [path for path in held if path.is_dir() or not any(path.match(kind) for kind in CHECKPOINT_FILES)]
    if others or (held and not (out / CONFIG_NAME).is_file()):
        what = f"{_listing(others)}, which no checkpoint writes" if others else f"no {CONFIG_NAME}, so no checkpoint"
        raise ConfigError(f"{out}: holds {what}; --overwrite replaces a checkpoint's files only; expected a "
                          f"directory holding a checkpoint, or a new one")
    made = not out.exists()
    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # a write cut short before
    staging.mkdir(parents=True)
    try:
        yield staging
        for path in held:  # the other checkpoint, kept until this one was written whole
            path.unlink()
        for path in staging.iterdir():
            path.rename(out / path.name)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _listing(paths: list[Path], most: int = 4) -> str:
    names = [path.name + ("/" if path.is_dir() else "") for path in paths]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def write_weights(tensors: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """One model.safetensors, or model-0000k-of-0000n.safetensors shards plus the index when it is too large.
    Weight files of an earlier write are removed first: a model.safetensors left beside a new index would be read
    instead of it (by transformers too), and a shard of an earlier index is dead weight."""
    for stale in [directory / WEIGHTS_NAME, directory / INDEX_NAME, *directory.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(directory / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
