"""Model configuration: nested dataclasses with a JSON round trip and validation.

A `ModelConfig` holds the three parts the article names — the image encoder (`VisionConfig`), the decoder LLM
(`TextConfig`) and how the two are joined (`FusionConfig`: Method A "unified" or Method B "cross").
Every invalid value raises `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.errors import ConfigError

FUSION_METHODS = ("unified", "cross")
PROJECTORS = ("linear", "mlp")
SELECT_STRATEGIES = ("default", "full")
VISION_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
CROSS_ATTENTION_SCOPES = ("previous", "latest")

# CLIP's normalisation constants, the usual default for ViT image encoders.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{owner}.{name}={value!r}: expected a positive integer")


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def _divides(owner: str, heads_field: str, heads: int, width_field: str, width: int) -> None:
    if width % heads:
        raise ConfigError(
            f"{owner}.{heads_field}={heads} does not divide {owner}.{width_field}={width}; "
            f"expected a divisor of {width}"
        )


@dataclass
class VisionConfig:
    """A ViT image encoder: Conv2d patch embedding, learned positions, optional CLS, pre-LN blocks."""

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 6
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    use_cls_token: bool = True
    pre_layernorm: bool = False  # CLIP normalises the embeddings once before the first block
    attention_bias: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)
        _positive("vision", image_size=self.image_size, patch_size=self.patch_size,
                  num_channels=self.num_channels, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size)
        if not isinstance(self.num_layers, int) or self.num_layers < 0:
            raise ConfigError(f"vision.num_layers={self.num_layers!r}: expected an integer >= 0")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.patch_size={self.patch_size} does not divide vision.image_size={self.image_size}; "
                f"expected a divisor of {self.image_size}"
            )
        _divides("vision", "num_heads", self.num_heads, "hidden_size", self.hidden_size)
        _choice("vision", "hidden_act", self.hidden_act, VISION_ACTIVATIONS)
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != self.num_channels:
                raise ConfigError(f"vision.{name}={value!r}: expected {self.num_channels} values, one per channel")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"vision.image_std={self.image_std!r}: expected positive values")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextConfig:
    """A Llama-style decoder LLM: RMSNorm, RoPE, grouped-query attention, SwiGLU."""

    vocab_size: int = 8192
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1376
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 puts biases on q/k/v

    def __post_init__(self) -> None:
        _positive("text", vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_layers=self.num_layers,
                  num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                  intermediate_size=self.intermediate_size, max_position_embeddings=self.max_position_embeddings)
        _divides("text", "num_heads", self.num_heads, "hidden_size", self.hidden_size)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"text.num_kv_heads={self.num_kv_heads} does not divide text.num_heads={self.num_heads}; "
                f"expected a divisor of {self.num_heads} (grouped-query attention shares each KV head "
                f"among num_heads / num_kv_heads query heads)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"text.hidden_size / text.num_heads = {self.head_dim}: RoPE needs an even head size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class FusionConfig:
    """How image features reach the LLM.

    method="unified" (Method A): projected image tokens replace `<image>` slots in the token sequence.
    method="cross" (Method B): projected image features are keys/values of gated cross-attention blocks that run
    before the decoder layers listed in `cross_attention_layers` (None: every 4th layer, as in Llama 3.2).
    """

    method: str = "unified"
    projector: str = "mlp"
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -1
    vision_feature_select_strategy: str = "default"
    cross_attention_layers: list[int] | None = None
    # "previous": a token sees every image whose marker precedes it; "latest": only the latest run of markers
    # (Flamingo's and Llama 3.2's interleaving rule).
    cross_attention_scope: str = "previous"

    def __post_init__(self) -> None:
        _choice("fusion", "method", self.method, FUSION_METHODS)
        _choice("fusion", "projector", self.projector, PROJECTORS)
        _choice("fusion", "vision_feature_select_strategy", self.vision_feature_select_strategy, SELECT_STRATEGIES)
        _choice("fusion", "cross_attention_scope", self.cross_attention_scope, CROSS_ATTENTION_SCOPES)
        layers = self.vision_feature_layer
        if isinstance(layers, (list, tuple)):
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ConfigError(f"fusion.vision_feature_layer={layers!r}: expected an int or a non-empty list of ints")
            self.vision_feature_layer = list(layers)
        elif not isinstance(layers, int) or isinstance(layers, bool):
            raise ConfigError(f"fusion.vision_feature_layer={layers!r}: expected an int or a non-empty list of ints")
        if self.cross_attention_layers is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.cross_attention_layers):
                raise ConfigError(
                    f"fusion.cross_attention_layers={self.cross_attention_layers!r}: expected a list of layer indices"
                )
            self.cross_attention_layers = sorted(set(self.cross_attention_layers))

    @property
    def feature_layers(self) -> list[int]:
        layers = self.vision_feature_layer
        return list(layers) if isinstance(layers, list) else [layers]


@dataclass
class ModelConfig:
    """The whole multimodal LLM: encoder + projector + decoder, joined by Method A or Method B."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    image_token_id: int = 3
    pad_token_id: int = 0
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _build(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _build(TextConfig, self.text, "text")
        if isinstance(self.fusion, str):  # ModelConfig(fusion="cross") is the switch the article describes
            self.fusion = FusionConfig(method=self.fusion)
        elif isinstance(self.fusion, dict):
            self.fusion = _build(FusionConfig, self.fusion, "fusion")
        for name in ("image_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.text.vocab_size:
                raise ConfigError(f"{name}={value!r}: expected a token id in 0..{self.text.vocab_size - 1}")
        num_states = self.vision.num_layers + 1  # the embedding output, then one per block
        for index in self.fusion.feature_layers:
            if not -num_states <= index < num_states:
                raise ConfigError(
                    f"fusion.vision_feature_layer={self.fusion.vision_feature_layer!r}: index {index} is out of range "
                    f"for a {self.vision.num_layers}-layer encoder; expected -{num_states}..{num_states - 1}"
                )
        if self.fusion.vision_feature_select_strategy == "default" and not self.vision.use_cls_token:
            raise ConfigError(
                "fusion.vision_feature_select_strategy='default' drops the CLS token but vision.use_cls_token is "
                "False; expected 'full'"
            )
        if self.fusion.method == "cross":
            layers = self.cross_attention_layers
            bad = [i for i in layers if not 0 <= i < self.text.num_layers]
            if bad:
                raise ConfigError(
                    f"fusion.cross_attention_layers={layers!r}: index {bad[0]} is out of range; expected indices in "
                    f"0..{self.text.num_layers - 1} (text.num_layers={self.text.num_layers})"
                )
            if not layers:
                raise ConfigError(
                    f"fusion.cross_attention_layers resolves to [] for text.num_layers={self.text.num_layers}; "
                    f"expected at least one index in 0..{self.text.num_layers - 1} for fusion.method='cross'"
                )

    @property
    def cross_attention_layers(self) -> list[int]:
        """Decoder layers preceded by a gated cross-attention block (Method B); empty for Method A."""
        if self.fusion.method != "cross":
            return []
        if self.fusion.cross_attention_layers is None:
            return list(range(3, self.text.num_layers, 4))
        return list(self.fusion.cross_attention_layers)

    @property
    def num_feature_tokens(self) -> int:
        """Image feature vectors per image after CLS selection."""
        keep_cls = self.vision.use_cls_token and self.fusion.vision_feature_select_strategy == "full"
        return self.vision.num_patches + int(keep_cls)

    @property
    def image_seq_length(self) -> int:
        """How many `<image>` tokens stand for one image in the text: the feature count for Method A, one marker
        for Method B (whose features enter through cross-attention instead)."""
        return self.num_feature_tokens if self.fusion.method == "unified" else 1

    # --- JSON round trip -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        return _build(cls, data, source)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data, source=str(path))
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected one of {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
