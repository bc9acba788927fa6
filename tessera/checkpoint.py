"""Model weights on disk: a Hugging Face-style directory with `config.json` and `model.safetensors`.

safetensors only — a checkpoint is data, never code, so nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from tessera.errors import CheckpointError, ConfigError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# the weights' dtype in memory, by name: "auto" keeps a tessera checkpoint's stored dtype (a bf16 conversion stays
# bf16) and loads a Hugging Face directory in float32
LOAD_DTYPES = ("auto", "float32", "bfloat16", "float16")


def load_dtype(name: str) -> torch.dtype | None:
    """The torch dtype of a LOAD_DTYPES name; None for "auto"."""
    if name not in LOAD_DTYPES:
        raise ConfigError(f"dtype {name!r}: expected one of {', '.join(LOAD_DTYPES)}")
    return None if name == "auto" else getattr(torch, name)


def tied_sources(module: nn.Module) -> dict[str, str]:
    """Each state-dict name that aliases a tensor stored under an earlier name (tied embeddings) → that name."""
    first: dict[int, str] = {}
    sources = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            sources[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return sources


def tied_names(module: nn.Module) -> set[str]:
    """State-dict names that alias a tensor stored under an earlier name: saved once, under that name."""
    return set(tied_sources(module))


def assign_weights(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors become the module's parameters (no copy, so a module built on meta is filled), and every tied
    alias is pointed at its source's new tensor (assigning the source alone would leave the alias behind)."""
    sources = tied_sources(module)
    with torch.no_grad():
        module.load_state_dict(tensors, strict=False, assign=True)
    for alias, source in sources.items():
        owner, _, attribute = alias.rpartition(".")
        setattr(module.get_submodule(owner), attribute, module.get_parameter(source))


@contextmanager
def written_whole(path: Path):
    """Yields a temporary path beside `path` to write to; it replaces `path` only once the write has finished, so a
    run stopped mid-write leaves the file as it was. Every file of a checkpoint is written so: a half-written
    model.safetensors, config.json or training_state.json made the checkpoint unreadable, and a half-rewritten
    metrics.jsonl lost the earlier runs' records."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


@contextmanager
def written_whole_directory(directory: Path):
    """Yields an empty directory beside `directory` to write a whole checkpoint into; it takes `directory`'s place
    only once written, so a run stopped mid-save leaves an earlier save there whole — still resumable, its training
    state with it (written into the same directory, it had to be removed first). Between the two renames that swap
    them (microseconds), the earlier save is `.NAME.previous`. Both names start with a dot: not checkpoints."""
    if directory.is_symlink():  # (a directory on another disk): swapped there, the link staying a link
        directory = directory.resolve()
    if os.path.ismount(directory):
        raise CheckpointError(f"{directory}: a mount point; a checkpoint is written beside its directory and then "
                              f"takes its place, which a mount point cannot give up; expected the disk mounted one "
                              f"level up (at OUT, or OUT/checkpoints)")
    staging = directory.with_name(f".{directory.name}.saving")
    previous = directory.with_name(f".{directory.name}.previous")
    for leftover in (staging, previous):  # a save cut short before
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        directory.rename(previous)
        staging.rename(directory)
        shutil.rmtree(previous, ignore_errors=True)  # saved already: what stays is removed at the next save
    else:
        staging.rename(directory)


def check_directory_to_write(path: str | Path, label: str) -> None:
    """ConfigError, starting with `label` (the flag or key and its value), if `path` cannot become a directory: it,
    or the nearest of its parents that exists, is a file. Checked before any work: mkdir would fail later, as a
    bare OSError naming no flag."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "a file" if existing == path else f"its parent {existing} is a file"
        raise ConfigError(f"{label}: {what}; expected a directory (made if missing)")


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (see `written_whole`)."""
    with written_whole(path) as partial:
        partial.write_text(text, encoding="utf-8")


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config.json, processor_config.json, …) as an object. ConfigError naming the file
    if it is not UTF-8 text, not JSON, or not an object; OSError (no such file, a directory) is left to the caller,
    which knows what the file should have been."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); expected a JSON file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def save_weights(module: nn.Module, directory: Path) -> Path:
    skip = tied_names(module)
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items() if name not in skip}
    path = directory / WEIGHTS_NAME
    with written_whole(path) as partial:
        save_file(tensors, str(partial), metadata={"format": "pt"})
    return path


def load_weights(module: nn.Module, directory: Path, dtype: torch.dtype | None = None) -> None:
    """Load `model.safetensors` strictly: every tensor present, none extra, every shape right. The file's tensors
    replace the module's parameters (built on the meta device by `parameters_on_meta`, or real ones), in `dtype`
    or, by default, as stored. They are read one at a time, so memory peaks near the model's own size: a bf16 7B
    checkpoint loads in ~14 GB, not through a float32 copy first."""
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected the model weights in safetensors format")
    aliases = tied_names(module)
    expected = {name: t for name, t in module.state_dict(keep_vars=True).items() if name not in aliases}
    try:
        with safe_open(str(path), framework="pt") as stored:
            names = set(stored.keys())
            _check_names(path, expected, names)
            for name, want in expected.items():
                shape = tuple(stored.get_slice(name).get_shape())
                if shape != tuple(want.shape):
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {shape}; the config expects {tuple(want.shape)}")
            tensors = {}
            for name, want in expected.items():
                tensor = stored.get_tensor(name)
                # always a copy: the tensor may map the file, and a parameter must not change when the file does
                tensor = tensor.to(dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype,
                                   copy=True)
                tensors[name] = tensor.to(want.device) if not want.is_meta else tensor
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    assign_weights(module, tensors)


def _check_names(path: Path, expected: dict, names: set[str]) -> None:
    missing = sorted(set(expected) - names)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing{more}; the config expects it")
    unexpected = sorted(names - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{path}: unexpected tensor {unexpected[0]!r}{more}; the config has no such weight")


@contextmanager
def parameters_on_meta():
    """Parameters created inside are moved to the meta device as they are registered (their initialisers then
    run on meta: free), for a model whose weights are about to be loaded; buffers such as RoPE frequencies stay
    real."""
    register = nn.Module.register_parameter
    owner = threading.get_ident()  # the patch is process-wide: modules other threads build meanwhile stay real

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta and threading.get_ident() == owner:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
