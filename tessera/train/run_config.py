"""A training run's YAML config: its fields, `key=value` overrides, and the checks that turn every value the run
could not honour — a wrong type, a value out of range, an unknown stage or model field, a fusion the recipe never
trains — into a ConfigError that names the key, before anything is loaded or trained.

    recipe: llava            # see tessera.train.recipes
    data: data/shapes        # train.json, test.json, text_train.jsonl, text_test.jsonl
    out: runs/llava
    model: tiny              # a preset name, ModelConfig fields, or {preset: tiny, text: {...}}
    steps: {text: 300, align: 150, instruct: 600}

or, to fine-tune a pretrained whole model (its config, weights, tokenizer and processor) instead of a preset:

    init_checkpoint: ckpt/llava   # a tessera checkpoint, or a transformers LLaVA / Llama 3.2 Vision directory
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tessera.checkpoint import check_directory_to_write
from tessera.config import FUSION_METHODS, ModelConfig
from tessera.errors import ConfigError
from tessera.presets.tiny import PRESETS
from tessera.processor import checkpoint_model_config
from tessera.text.tokenizer import SMALLEST_VOCAB
from tessera.train.loop import PRECISIONS
from tessera.train.recipes import (RECIPES, SCHEDULES, TEXT_PRETRAINING, Recipe, Stage, encoder_pretraining,
                                   get_recipe)


@dataclass
class RunConfig:
    recipe: str
    data: str
    out: str = "runs/default"
    # a preset name; ModelConfig fields (on ModelConfig's defaults); or {preset: NAME, …fields to change in it};
    # default: tiny (none with init_checkpoint, whose model is the checkpoint's)
    model: str | dict | None = None
    fusion: str | None = None  # default: the recipe's
    llm_checkpoint: str | None = None  # start from a trained LLM (skips text pretraining)
    # start from a pretrained whole model — encoder, projector, LLM, its tokenizer and processor (skips text and
    # encoder pretraining)
    init_checkpoint: str | None = None
    # caption-pretrain the encoder first, standing in for CLIP/SigLIP pretraining; "auto": only when the recipe's
    # first stage keeps the encoder frozen (a recipe that trains the encoder from its first step needs none)
    pretrain_encoder: bool | str = "auto"
    tokenizer: str | None = None  # tokenizer.json; default: train one on the dataset's text
    vocab_size: int | None = None  # of the tokenizer trained; default 512 (none with init_checkpoint: it has one)
    max_length: int = 256
    steps: dict[str, int] = field(default_factory=dict)  # per stage name
    lr: dict[str, float] = field(default_factory=dict)  # per stage name
    lr_scale: dict[str, dict[str, float]] = field(default_factory=dict)  # stage → component → multiplier
    batch_size: int = 32
    grad_accum: int = 1
    warmup: float = 0.05  # the fraction of each stage's steps spent warming up, in [0, 1) — not a step count
    # "cosine" or "wsd" (warmup, hold the peak, decay over the last `decay` fraction): one for every stage, or a
    # mapping from stage name (stages not named keep the cosine)
    schedule: str | dict[str, str] = "cosine"
    decay: float = 0.2
    min_lr_ratio: float = 0.1
    clip: float = 1.0  # the gradient norm is clipped to this; 0: no clipping
    weight_decay: float = 0.0  # AdamW's, on tensors of 2+ dims: biases, norm scales, gates never decay
    gate_lr_scale: float = 1.0
    checkpoint_every: int = 0
    keep_checkpoints: int = 0
    group_by_length: bool = False  # batch records of similar length together (less padding; see TrainSettings)
    precision: str = "fp32"  # fp32 | bf16-mixed | auto (bf16-mixed where the CPU has native bf16 matmuls)
    # torch.compile the model (MultimodalLM.compile): inductor fuses the element-wise work around the products. The
    # benchmark's training step ran 1.03–1.11× faster; but each stage (its frozen parts), new batch shape and
    # evaluation compiles first, so it pays on long runs of big models, not on the quickstart's (BENCHMARKS.md)
    compile: bool = False
    seed: int = 0
    strict: bool = False
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("recipe", "data", "out"):
            setattr(self, name, _text(name, getattr(self, name)))
        check_directory_to_write(self.out, f"out={self.out}")
        for name in ("llm_checkpoint", "init_checkpoint", "tokenizer"):
            if getattr(self, name) is not None:
                setattr(self, name, _text(name, getattr(self, name)))
        get_recipe(self.recipe)
        if self.fusion not in (None, *FUSION_METHODS):
            raise ConfigError(f"fusion={self.fusion!r}: expected {', '.join(FUSION_METHODS)}, or nothing (the "
                              f"recipe's)")
        check_fusion_is_trained(self.recipe, self.fusion)
        if not (isinstance(self.pretrain_encoder, bool) or self.pretrain_encoder == "auto"):  # 1 == True in Python
            raise ConfigError(f"pretrain_encoder={self.pretrain_encoder!r}: expected true, false or auto")
        if self.init_checkpoint is not None:
            check_init_checkpoint_alone(self)
        elif self.model is None:
            self.model = "tiny"
        elif not isinstance(self.model, (str, dict)):
            raise ConfigError(f"model={self.model!r}: expected a preset ({', '.join(PRESETS)}) or a mapping of "
                              f"ModelConfig fields")
        for name in ("batch_size", "grad_accum", "max_length"):
            setattr(self, name, _integer(name, getattr(self, name), minimum=1))
        # a byte-level BPE holds every byte and the special tokens before any merge: vocab_size 5 gave 263 silently
        if not self.init_checkpoint:
            self.vocab_size = _integer("vocab_size", 512 if self.vocab_size is None else self.vocab_size,
                                       minimum=SMALLEST_VOCAB)
        for name in ("checkpoint_every", "keep_checkpoints", "seed"):
            setattr(self, name, _integer(name, getattr(self, name), minimum=0))
        if self.threads is not None:
            self.threads = _integer("threads", self.threads, minimum=1)
        for name in ("group_by_length", "strict", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected true or false")
        # YAML 1.1 reads "1e-3" (no dot) as a string: numbers accept it as the number everybody means.
        self.warmup = _number("warmup", self.warmup, "a fraction of each stage's steps in [0, 1), e.g. 0.05 (not "
                              "a step count)", lambda x: 0 <= x < 1)
        for name in ("decay", "min_lr_ratio"):
            setattr(self, name, _number(name, getattr(self, name), "a fraction between 0 and 1",
                                        lambda x: 0 <= x <= 1))
        self.clip = _number("clip", self.clip, "a maximum gradient norm > 0, or 0 for no clipping", lambda x: x >= 0)
        self.weight_decay = _number("weight_decay", self.weight_decay, "a number >= 0", lambda x: x >= 0)
        self.gate_lr_scale = _number("gate_lr_scale", self.gate_lr_scale, "a number > 0", lambda x: x > 0)
        fusion = self.fusion or get_recipe(self.recipe).fusion
        if self.gate_lr_scale != 1 and fusion == "unified":  # it would change nothing, silently
            raise ConfigError(f"gate_lr_scale={self.gate_lr_scale}: fusion {fusion!r} has no gates (only "
                              f"cross-attention blocks do); expected fusion: cross or hybrid, or no gate_lr_scale")
        self.steps = {stage: _integer(f"steps.{stage}", value, minimum=0)
                      for stage, value in _mapping("steps", self.steps, "steps: {instruct: 200}").items()}
        self.lr = {stage: _number(f"lr.{stage}", value, "a number >= 0", lambda x: x >= 0)
                   for stage, value in _mapping("lr", self.lr, "lr: {instruct: 1.0e-3}").items()}
        self.lr_scale = {
            stage: {c: _number(f"lr_scale.{stage}.{c}", v, "a number >= 0", lambda x: x >= 0)
                    for c, v in _mapping(f"lr_scale.{stage}", table, f"lr_scale.{stage}: {{llm: 0.1}}").items()}
            for stage, table in _mapping("lr_scale", self.lr_scale, "lr_scale: {instruct: {llm: 0.1}}").items()}
        for stage, value in (self.schedule.items() if isinstance(self.schedule, dict) else [("", self.schedule)]):
            if value not in SCHEDULES:
                where = f"schedule.{stage}" if stage else "schedule"
                raise ConfigError(f"{where}={value!r}: expected one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r}: expected one of {', '.join(PRECISIONS)}")
        build_stages(self)  # stage names in steps, lr, lr_scale and schedule
        # the model's fields (an init_checkpoint's config and fusion), and max_length against it
        model_config(self, padded_vocab(self.vocab_size) if self.vocab_size else None)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        path = Path(path)
        try:
            data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such run config") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a directory; expected a run config YAML file (see README: Train)") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_one_line(e)})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of run-config fields, got {type(data).__name__}")
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "run config") -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]!r}; expected one of {', '.join(sorted(known))}")
        missing = [k for k in ("recipe", "data") if k not in data]
        if missing:
            raise ConfigError(f"{source}: missing field {missing[0]!r}")
        return cls(**data)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())  # PyYAML's messages span lines; the CLI reports in one


def _number(name: str, value: Any, expected: str = "a number", valid=lambda x: True) -> float:
    number = None
    if not isinstance(value, bool):
        try:
            number = float(value)
        except (TypeError, ValueError):
            pass
    if number is None or not math.isfinite(number) or not valid(number):
        raise ConfigError(f"{name}={value!r}: expected {expected}")
    return number


def _integer(name: str, value: Any, minimum: int) -> int:
    """An integer >= minimum; 1e3 (a string to YAML 1.1) or 1000.0 count as the integer they write."""
    expected = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    number = _number(name, value, expected, lambda x: x == int(x) and x >= minimum)
    return value if isinstance(value, int) else int(number)


def _mapping(name: str, value: Any, example: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{name}={value!r}: expected a mapping, e.g. {example}")
    return value


def _text(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name}={value!r}: expected a non-empty string")
    return value


def check_fusion_is_trained(recipe_name: str, fusion: str | None) -> None:
    """Method B reads the image only through cross-attention blocks whose gates start at 0: under a recipe that
    never trains them the gates stay shut, the projector gets no gradient, and the model learns to ignore images
    (the hybrid, its high-resolution tiles)."""
    recipe = get_recipe(recipe_name)
    if fusion in ("cross", "hybrid") and not any("cross_attention" in s.train for s in recipe.stages):
        trains_it = [r.name for r in RECIPES.values() if any("cross_attention" in s.train for s in r.stages)]
        what = "the image" if fusion == "cross" else "the image's tiles"
        raise ConfigError(f"fusion={fusion!r} with recipe {recipe.name!r}: no stage of {recipe.name} trains "
                          f"cross_attention, so nothing would carry {what} into the LLM; expected fusion: "
                          f"{recipe.fusion} (the recipe's) or a recipe that trains cross_attention "
                          f"({', '.join(trains_it)})")


def check_init_checkpoint_alone(run: RunConfig) -> None:
    """init_checkpoint brings the whole model, its tokenizer and processor: a field that would build or size another
    model beside it is an error, not silently ignored."""
    where = f"init_checkpoint {run.init_checkpoint}"
    if run.llm_checkpoint is not None:
        raise ConfigError(f"llm_checkpoint={run.llm_checkpoint} with {where}: the whole model's LLM is in the "
                          f"checkpoint already; expected one of init_checkpoint and llm_checkpoint")
    if run.model is not None:
        raise ConfigError(f"model={run.model!r} with {where}: the model is the checkpoint's (its config.json); "
                          f"expected no model")
    if run.vocab_size is not None:
        raise ConfigError(f"vocab_size={run.vocab_size!r} with {where}: the checkpoint's tokenizer is used, and "
                          f"vocab_size only sizes a tokenizer trained for the run; expected no vocab_size")
    if run.pretrain_encoder is True:
        raise ConfigError(f"pretrain_encoder=true with {where}: its encoder is pretrained already (pretraining "
                          f"stands in for CLIP/SigLIP's); expected pretrain_encoder: auto or false")


def checkpoint_fusion_config(run: RunConfig) -> ModelConfig:
    """The init_checkpoint's model config, checked against the run's fusion (a Method A model cannot be trained
    by a recipe of Method B's cross-attention blocks, which it has none of)."""
    path = Path(run.init_checkpoint)
    expected = ("expected a checkpoint directory: a tessera checkpoint (config.json, model.safetensors, e.g. "
                "runs/x/checkpoint) or a transformers LLaVA / Llama 3.2 Vision directory")
    if not path.is_dir():
        raise ConfigError(f"init_checkpoint={path}: no such directory; {expected}")
    if not (path / "config.json").is_file():
        inside = f" ({path / 'checkpoint'}?)" if (path / "checkpoint" / "config.json").is_file() else ""
        raise ConfigError(f"init_checkpoint={path}: no config.json in it{inside}; {expected}")
    config = checkpoint_model_config(path)
    method, fusion = config.fusion.method, run.fusion or get_recipe(run.recipe).fusion
    if method != fusion:
        if run.fusion:
            raise ConfigError(f"fusion={run.fusion!r}: init_checkpoint {path} is a {method!r} model; expected "
                              f"fusion: {method} or no fusion")
        others = [r.name for r in RECIPES.values() if r.fusion == method]
        raise ConfigError(f"recipe={run.recipe!r} trains fusion {fusion!r} but init_checkpoint {path} is a "
                          f"{method!r} model; expected a recipe of fusion {method} ({', '.join(others) or 'none'})")
    return config


def apply_override(data: dict, item: str) -> None:
    """`steps.text=200` or `seed=3`: a dotted key and a YAML value. `model.text.num_layers=2` changes the preset in
    use (model: {preset: tiny, text: {num_layers: 2}}) rather than starting from ModelConfig's defaults."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. steps.instruct=400")
    key, value = item.split("=", 1)
    *parents, last = key.split(".")
    if parents and parents[0] == "model" and isinstance(data.get("model", "tiny"), str):
        data["model"] = {"preset": data.get("model", "tiny")}
    node = data
    for depth, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            where = ".".join(parents[:depth + 1])
            raise ConfigError(f"override {item!r}: {where} is {node!r}, not a mapping; set {where} as a whole")
    try:
        node[last] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: {value!r} is not a YAML value ({_one_line(e)})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: YAML lets the later value
    win without a word, and a second `steps:` further down a run config silently undid the first."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` brings keys that written ones may override
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base loader says so
                break
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice in one mapping (first on line {first_line[key] + 1}); "
                    f"expected each key once", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def trains_only_the_encoder(stage: Stage) -> bool:
    return set(stage.train) <= {"vision"}


def check_encoder_free_recipe(run: RunConfig, recipe: Recipe) -> None:
    """Fuyu's design (vision.encoder="none") has no encoder: the projector alone embeds the patches. Pretraining an
    encoder, or a stage that trains nothing but the encoder, would train nothing — unless that stage is given 0
    steps, which leaves it out."""
    if run.pretrain_encoder is True:
        raise ConfigError("pretrain_encoder=true: the model has no encoder (vision.encoder='none'); expected false or "
                          "auto")
    idle = next((stage for stage in recipe.stages
                 if trains_only_the_encoder(stage) and run.steps.get(stage.name, stage.steps)), None)
    if idle is not None:
        fitting = [r.name for r in RECIPES.values() if r.fusion == recipe.fusion
                   and not any(trains_only_the_encoder(stage) for stage in r.stages)]
        raise ConfigError(f"recipe {run.recipe!r}: stage {idle.name!r} trains only the encoder, which "
                          f"vision.encoder='none' does not have; expected a recipe whose every stage trains more "
                          f"({', '.join(fitting)}), or steps.{idle.name}: 0 to leave the stage out")


def build_stages(run: RunConfig) -> list[Stage]:
    recipe = get_recipe(run.recipe)
    stages = [] if run.llm_checkpoint or run.init_checkpoint else [TEXT_PRETRAINING]
    encoder = encoder_pretraining(run.fusion or recipe.fusion)
    encoder_free = model_config(run, padded_vocab(run.vocab_size) if run.vocab_size else None).vision.encoder == "none"
    if encoder_free:
        check_encoder_free_recipe(run, recipe)  # and no encoder to pretrain
    elif not run.init_checkpoint and (run.pretrain_encoder is True or (run.pretrain_encoder == "auto" and
                                                                       "vision" not in recipe.stages[0].train)):
        stages.append(encoder)
    # an encoder-free model's encoder-only stages are left out (check_encoder_free_recipe: they have 0 steps)
    stages += [stage for stage in recipe.stages if not (encoder_free and trains_only_the_encoder(stage))]
    names = {s.name for s in stages}
    if len(names) != len(stages):
        raise ConfigError(f"recipe {run.recipe!r}: two stages share a name; expected unique stage names")
    schedules = run.schedule if isinstance(run.schedule, dict) else {s.name: run.schedule for s in stages}
    tables = {"steps": run.steps, "lr": run.lr, "lr_scale": run.lr_scale, "schedule": schedules}
    # settings for a skipped stage may stay in the file
    skipped = {TEXT_PRETRAINING.name} if run.llm_checkpoint else set()
    if encoder_free:
        skipped |= {encoder.name} | {stage.name for stage in recipe.stages if trains_only_the_encoder(stage)}
        if run.steps.get(encoder.name):  # a config written for a model with an encoder, most likely
            raise ConfigError(f"steps.{encoder.name}={run.steps[encoder.name]}: the model has no encoder to "
                              f"pretrain (vision.encoder='none'); expected no steps.{encoder.name} (or 0)")
    if run.init_checkpoint:
        pretraining = {TEXT_PRETRAINING.name, encoder.name} - names
        skipped |= pretraining
        # but not steps: a pretrained whole model's LLM and encoder would be pretrained again from where they are,
        # on the run's data — asked for, that is most likely a config written for a run from scratch
        asked = sorted(name for name in pretraining if run.steps.get(name))
        if asked:
            raise ConfigError(f"steps.{asked[0]}={run.steps[asked[0]]} with init_checkpoint {run.init_checkpoint}: "
                              f"a pretrained whole model skips the {' and '.join(sorted(pretraining))} stages; "
                              f"expected no steps.{asked[0]} (or 0), or the recipe's stages "
                              f"({', '.join(s.name for s in stages)}) to train it")
    for table, per_stage in tables.items():
        unknown = sorted(set(per_stage) - names - skipped, key=str)
        if unknown:
            raise ConfigError(f"{table}.{unknown[0]}: recipe {run.recipe!r} has no stage {unknown[0]!r}; "
                              f"its stages are {', '.join(s.name for s in stages)}")
    return [dataclasses.replace(s, steps=run.steps.get(s.name, s.steps), lr=run.lr.get(s.name, s.lr),
                                lr_scale=run.lr_scale.get(s.name, s.lr_scale),
                                schedule=schedules.get(s.name, s.schedule)) for s in stages]


def padded_vocab(size: int) -> int:
    """A multiple of 64: keeps the LM head's matmul aligned."""
    return -(-size // 64) * 64


def model_config(run: RunConfig, vocab_size: int | None) -> ModelConfig:
    """The run's model config: an init_checkpoint's (vocab_size unused), or the `model` field's for a tokenizer of
    vocab_size tokens."""
    fusion = run.fusion or get_recipe(run.recipe).fusion
    if run.init_checkpoint:
        config = checkpoint_fusion_config(run)
    elif isinstance(run.model, str):
        config = _preset(run.model, fusion, vocab_size)
    else:
        fields = {k: v for k, v in run.model.items() if k != "preset"}
        if "preset" in run.model:  # a preset with some fields changed
            fields = _merged(_preset(run.model["preset"], fusion, vocab_size, "model.preset").to_dict(), fields)
        elif isinstance(fields.get("text", {}), dict):  # the tokenizer's vocabulary, as a preset gets, unless given
            fields["text"] = {"vocab_size": vocab_size, **fields.get("text", {})}
        if not isinstance(fields.get("fusion", {}), dict):
            raise ConfigError(f"model.fusion={fields['fusion']!r}: expected a mapping of FusionConfig fields (the "
                              f"method is the run's fusion)")
        method = fields.get("fusion", {}).get("method", fusion)
        if method != fusion:  # it would be overwritten by the run's, silently
            whose = "" if run.fusion else f", the recipe {run.recipe}'s"
            raise ConfigError(f"model.fusion.method={method!r}: the method is the run's fusion ({fusion!r} "
                              f"here{whose}); expected fusion: {method} beside recipe, or no model.fusion.method")
        try:
            config = ModelConfig.from_dict({**fields, "fusion": {**fields.get("fusion", {}), "method": fusion}})
        except ConfigError as e:
            raise ConfigError(f"model: {e}") from None
    if run.max_length > config.text.max_position_embeddings:
        raise ConfigError(f"max_length={run.max_length} exceeds the model's text.max_position_embeddings="
                          f"{config.text.max_position_embeddings}; expected a max_length it can hold")
    if run.max_length <= config.image_seq_length:  # every record with an image would be cut, and skipped
        raise ConfigError(f"max_length={run.max_length}: one image alone takes {config.image_seq_length} tokens of "
                          f"this model; expected a max_length that holds an image and its text (a LLaVA-1.5 takes "
                          f"576 per image: max_length 1024, say)")
    return config


def _preset(name: Any, fusion: str, vocab_size: int, key: str = "model") -> ModelConfig:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{key}={name!r}: expected a preset ({', '.join(PRESETS)})" +
                          (" or a config mapping" if key == "model" else ""))
    return PRESETS[name](fusion, vocab_size)


def _merged(base: dict, changes: dict) -> dict:
    """base with changes applied, mapping by mapping (model: {preset: tiny, text: {num_layers: 2}} keeps the
    preset's other text fields)."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = _merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) \
            else value
    return merged
