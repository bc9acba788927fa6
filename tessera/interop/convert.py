"""Import: a Hugging Face checkpoint directory → tessera's MultimodalLM (and its processor).

    model = MultimodalLM.from_pretrained("llava-1.5-7b-hf")     # converts on the fly
    tessera convert llava-1.5-7b-hf ckpt                        # or once, to a tessera checkpoint

The architecture comes from config.json's "architectures"; never from the directory's name.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tessera.checkpoint import parameters_on_meta
from tessera.errors import CheckpointError, ConfigError
from tessera.interop import llava, mllama
from tessera.interop.hub_files import (
    CONFIG_NAME, GENERATION_CONFIG_NAME, INTEGER, INTEGERS, NULL, checked, is_hf_checkpoint, output_directory,
    read_json, read_weights, write_json,
)
from tessera.interop.name_map import import_weights
from tessera.model import MultimodalLM

FAMILIES: dict[str, ModuleType] = {llava.ARCHITECTURE: llava, mllama.ARCHITECTURE: mllama}


def family_of(hf_config: dict[str, Any], path: Path) -> ModuleType:
    architectures = hf_config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"{path}: architectures={architectures!r}; expected a list of class names, as transformers "
                          f"writes it (['LlavaForConditionalGeneration'], say)")
    known = [a for a in architectures if a in FAMILIES]
    if not known:
        named = (f"architectures={architectures!r}" if "architectures" in hf_config
                 else "no 'architectures' field, which names the model class")
        raise ConfigError(f"{path}: {named} (model_type={hf_config.get('model_type')!r}); tessera imports "
                          f"{', '.join(FAMILIES)}")
    return FAMILIES[known[0]]


def hf_model_config(directory: Path):
    """(family module, tessera ModelConfig) of a Hugging Face checkpoint directory."""
    path = directory / CONFIG_NAME
    hf = read_json(path)
    family = family_of(hf, path)
    generation_path = directory / GENERATION_CONFIG_NAME
    generation = checked(read_json(generation_path, required=False), {"eos_token_id": (INTEGER, INTEGERS, NULL)},
                         str(generation_path))
    try:
        return family, family.config_from_hf(hf, str(path), generation)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except (TypeError, AttributeError, ValueError, KeyError) as e:  # a value of the wrong kind, met while reading
        raise ConfigError(f"{path}: a field holds a value of the wrong kind ({type(e).__name__}: {e}); expected the "
                          f"types transformers writes (numbers as numbers, text_config and vision_config as "
                          f"objects)") from None


def load_hf_model(directory: str | Path, dtype: torch.dtype | None = None) -> MultimodalLM:
    """Build tessera's modules for a LLaVA or Llama 3.2 Vision checkpoint and fill them with its weights, kept in
    `dtype` (default float32). The model is built without weights and each checkpoint tensor is dropped once
    used, so memory peaks near the model's own size, not twice it (what a 7B checkpoint on a laptop needs)."""
    directory = Path(directory)
    family, config = hf_model_config(directory)
    tensors, source = read_weights(directory)
    renamed = family.current_names(list(tensors))  # checkpoints saved in older layouts
    tensors = {renamed[name]: tensor for name, tensor in tensors.items()}
    with parameters_on_meta():  # no random init of billions of weights only to overwrite them
        model = MultimodalLM(config)
    import_weights(model, family.weight_rules(config), tensors, source, ignored=family.unread(list(tensors), config),
                   dtype=dtype or torch.float32, assign=True,
                   stored_names={new: old for old, new in renamed.items()})
    meta = [name for name, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CheckpointError(f"{source}: tensor for {meta[0]!r} never loaded")
    return model.eval()


def convert(hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype | None = None,
            overwrite: bool = False) -> Path:
    """Write a tessera checkpoint (config.json, model.safetensors, tokenizer, processor settings and the source's
    generation_config.json) for a Hugging Face checkpoint into `out_dir`, a new or empty directory (`overwrite`:
    or one holding another checkpoint, replaced once this one is written; see `output_directory`)."""
    from tessera.interop.processor import HubProcessor

    config_file = Path(hf_dir) / CONFIG_NAME
    if config_file.is_file() and not is_hf_checkpoint(hf_dir):  # its config names no class
        read_json(config_file)  # or is no JSON object at all (a download cut short): said so first
        raise ConfigError(f"{hf_dir}: a tessera checkpoint already; expected a transformers directory (generate, "
                          f"eval, serve, train and export take this one as it is)")
    with output_directory(out_dir, hf_dir, "converted", overwrite) as staging:
        model = load_hf_model(hf_dir, dtype)
        processor = HubProcessor.from_hf_dir(hf_dir, model.config)
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        # tessera reads only its EOS ids, but the sampling settings (max_length, do_sample, temperature, …) are the
        # model's own: kept for `tessera export` to write back
        generation = read_json(Path(hf_dir) / GENERATION_CONFIG_NAME, required=False)
        if generation is not None:
            write_json(staging / GENERATION_CONFIG_NAME, generation)
    return Path(out_dir)
