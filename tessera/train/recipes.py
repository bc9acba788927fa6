"""Training recipes from the article: each surveyed system's stage plan — which components train on which data.

A recipe is a fusion method plus a list of stages. Every recipe is preceded by a text-only stage that pretrains
the LLM (the surveyed systems all start from a pretrained text LLM) unless the run starts from an LLM checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.errors import ConfigError
from tessera.model import COMPONENTS

DATA_KINDS = ("text", "captions", "questions", "mix")
SCHEDULES = ("cosine", "wsd")


@dataclass
class Stage:
    name: str
    train: tuple[str, ...]  # components that learn in this stage; the rest stay frozen
    data: str  # text | captions | questions | mix
    steps: int = 200
    lr: float = 1e-3
    lr_scale: dict[str, float] = field(default_factory=dict)  # per-component multiplier of lr
    # after warmup, "cosine" decays over the whole stage; "wsd" (warmup-stable-decay, as in MiniCPM) holds the peak
    # and decays linearly over the stage's last steps — more steps at a high rate
    schedule: str = "cosine"
    # components whose learned weights outlive the stage (None: all that trained); the others are put back as
    # they were before it — how an encoder is pretrained with a decoder that is then thrown away
    keep: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        self.train = tuple(self.train)
        for component in self.train:
            if component not in COMPONENTS:
                raise ConfigError(f"stage {self.name!r}: train={component!r}; expected components from "
                                  f"{', '.join(COMPONENTS)}")
        if self.data not in DATA_KINDS:
            raise ConfigError(f"stage {self.name!r}: data={self.data!r}; expected one of {', '.join(DATA_KINDS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"stage {self.name!r}: schedule={self.schedule!r}; expected one of "
                              f"{', '.join(SCHEDULES)}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"stage {self.name!r}: steps={self.steps!r}; expected an integer >= 0")
        if self.keep is not None:
            self.keep = tuple(self.keep)
            stray = [c for c in self.keep if c not in self.train]
            if stray:
                raise ConfigError(f"stage {self.name!r}: keep={stray[0]!r} does not train in this stage")
        unknown = set(self.lr_scale) - set(COMPONENTS)
        if unknown:
            raise ConfigError(f"lr_scale.{self.name}.{sorted(unknown)[0]}: no such component; expected one of "
                              f"{', '.join(COMPONENTS)}")
        idle = [c for c in self.lr_scale if c not in self.train]  # its rate would change nothing, silently
        if idle:
            raise ConfigError(f"lr_scale.{self.name}.{idle[0]}: stage {self.name!r} does not train {idle[0]} (it "
                              f"trains {', '.join(self.train)}); expected a component the stage trains")

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(c for c in COMPONENTS if c not in self.train)


@dataclass
class Recipe:
    name: str
    fusion: str
    summary: str
    stages: list[Stage]


TEXT_PRETRAINING = Stage("text", train=("llm",), data="text", steps=300)


def encoder_pretraining(fusion: str) -> Stage:
    """The surveyed systems start from a pretrained image encoder (CLIP, SigLIP, InternViT); ours is pretrained
    here as an image captioner (CapPa): the whole model learns to describe every shape, colour, size and
    position, then only the encoder is kept — the LLM, projector and cross-attention layers go back to what they
    were, so the recipe that follows starts exactly where the article's systems do."""
    train = ("vision", "projector", "llm") + (("cross_attention",) if fusion != "unified" else ())
    return Stage("encoder_pretrain", train=train, data="captions", steps=400, keep=("vision",))


V, P, L, X = "vision", "projector", "llm", "cross_attention"

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("llava", "unified", "projector only on captions, then projector + LLM on questions (encoder frozen)", [
        Stage("align", (P,), "captions"),
        Stage("instruct", (P, L), "questions"),
    ]),
    Recipe("llama3.2", "cross", "encoder, adapter and cross-attention layers train; the LLM stays frozen", [
        Stage("pretrain", (V, P, X), "captions"),
        Stage("finetune", (V, P, X), "questions"),
    ]),
    Recipe("molmo", "unified", "one stage, everything trains", [
        Stage("train", (V, P, L), "mix"),
    ]),
    Recipe("qwen2-vl", "unified", "encoder only; then everything; then the LLM only", [
        Stage("encoder", (V,), "captions"),
        Stage("joint", (V, P, L), "mix"),
        Stage("instruct", (L,), "questions"),
    ]),
    Recipe("baichuan-omni", "unified", "projector; then + encoder; then everything", [
        Stage("projector", (P,), "captions"),
        Stage("encoder", (V, P), "captions"),
        Stage("joint", (V, P, L), "mix"),
    ]),
    Recipe("nvlm-d", "unified", "projector; then projector + LLM (encoder frozen)", [
        Stage("align", (P,), "captions"),
        Stage("joint", (P, L), "mix"),  # NVLM keeps its InternViT-6B frozen in every stage
    ]),
    Recipe("nvlm-x", "cross", "LLM frozen; cross-attention layers and projector train in every stage", [
        Stage("align", (P, X), "captions"),
        Stage("finetune", (P, X), "questions"),
    ]),
    # NVLM's pretraining aligns only the new modules; its SFT also trains the LLM, whose own sequence carries the
    # thumbnail. The encoder stays frozen throughout, as in all three NVLM models.
    Recipe("nvlm-h", "hybrid", "projector + cross-attention; then + LLM (encoder frozen)", [
        Stage("align", (P, X), "captions"),
        Stage("finetune", (P, L, X), "questions"),
    ]),
]}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"recipe {name!r}: expected one of {', '.join(RECIPES)}")
    return RECIPES[name]
