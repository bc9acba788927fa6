"""Model configuration: nested dataclasses with a JSON round trip and validation.

A `ModelConfig` holds the three parts the article names — the image encoder (`VisionConfig`), the decoder LLM
(`TextConfig`) and how the two are joined (`FusionConfig`: Method A "unified", Method B "cross", or NVLM-H's
"hybrid" of the two).
Every invalid value raises `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tessera.checkpoint import read_json_object, write_whole
from tessera.errors import ConfigError

FUSION_METHODS = ("unified", "cross", "hybrid")
PROJECTORS = ("linear", "mlp")
SELECT_STRATEGIES = ("default", "full")
VISION_ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")
CROSS_ATTENTION_SCOPES = ("previous", "latest")
CROSS_ATTENTION_PLACEMENTS = ("before", "replace")
CROSS_ATTENTION_BLIND_ROWS = ("skip", "attend_all")
VISION_ENCODERS = ("vit", "tiled", "none")
ROPE_TYPES = ("default", "llama3")
TEXT_FAMILIES = ("llama", "mistral", "qwen2")
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

# CLIP's normalisation constants, the usual default for ViT image encoders.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _positive(owner: str, **values: Any) -> None:
    for name, value in values.items():
        if not is_integer(value) or value <= 0:
            raise ConfigError(f"{owner}.{name}={value!r}: expected a positive integer")


def _float(owner: str, name: str, value: Any, positive: bool = True) -> float:
    """A number field; YAML 1.1 reads "1e-5" (no dot) as a string, so numeric strings are accepted."""
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is not None and not math.isfinite(number):  # an eps or theta of inf or nan gives NaN activations
        raise ConfigError(f"{owner}.{name}={value!r}: expected a finite number")
    if number is None or (positive and number <= 0):
        raise ConfigError(f"{owner}.{name}={value!r}: expected a {'positive ' if positive else ''}number")
    return number


def _flags(owner: str, config: Any, *names: str) -> None:
    """true/false fields: the string "false" (a hand-edited JSON config) is truthy, and would silently mean true."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ConfigError(f"{owner}.{name}={value!r}: expected true or false")


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to a config


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sequence(field_name: str, value: Any, expected: str) -> list:
    """A list field's items; a lone number or null names the field instead of failing as 'not iterable'."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{field_name}={value!r}: expected {expected}")
    return list(value)


def _choice(owner: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{owner}.{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")


def check_grid_list(field_name: str, grids: Any, max_field: str, max_tiles: int) -> None:
    """Tile grids: a non-empty list of [rows, columns] pairs of at most max_tiles tiles."""
    if (not isinstance(grids, (list, tuple)) or not grids
            or any(not isinstance(g, (list, tuple)) or len(g) != 2 or not all(is_integer(n) and n > 0 for n in g)
                   or g[0] * g[1] > max_tiles for g in grids)):
        raise ConfigError(f"{field_name}={grids!r}: expected a non-empty list of [rows, columns] pairs of at most "
                          f"{max_field}={max_tiles} tiles, or null")


def _divides(owner: str, heads_field: str, heads: int, width_field: str, width: int) -> None:
    if width % heads:
        raise ConfigError(
            f"{owner}.{heads_field}={heads} does not divide {owner}.{width_field}={width}; "
            f"expected a divisor of {width}"
        )


@dataclass
class VisionConfig:
    """A ViT image encoder: Conv2d patch embedding, learned positions, optional CLS, pre-LN blocks.

    encoder="tiled" is Llama 3.2 Vision's encoder (vision/tiled.py): the image arrives as up to `max_num_tiles`
    tiles of image_size², each tile gets aspect-ratio embeddings, `num_layers` local blocks run over all tiles of one
    image, then `num_global_layers` gated blocks, and the outputs of the local blocks listed in
    `intermediate_layers` are appended on channels.

    With fusion.method="hybrid" (NVLM-H) the ViT reads an image as a thumbnail and up to `max_num_tiles` tiles of
    image_size² (dynamic high resolution: the grid among `aspect_ratios` closest to the image's shape).

    encoder="none" is Fuyu's encoder-free design: no ViT at all; each patch's raw pixels (channels·patch² values,
    normalised) are a feature, and the projector alone embeds them into the LLM. Only image_size, patch_size, the
    channels and the normalisation apply; the ViT's fields are kept but unused.
    """

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
    patch_bias: bool = True  # CLIP's patch convolution has no bias, SigLIP's has one
    encoder: str = "vit"
    # encoder="tiled", and the ViT under fusion.method="hybrid":
    max_num_tiles: int = 4
    supported_aspect_ratios: list[list[int]] | None = None  # tile grids; None: every grid of <= max_num_tiles tiles
    # encoder="tiled" only:
    num_global_layers: int = 0
    intermediate_layers: list[int] = field(default_factory=list)  # local blocks (0-based) whose outputs are kept

    def __post_init__(self) -> None:
        self.layer_norm_eps = _float("vision", "layer_norm_eps", self.layer_norm_eps)
        self.image_mean = tuple(_float("vision", "image_mean", m, positive=False)
                                for m in _sequence("vision.image_mean", self.image_mean, "a list of numbers"))
        self.image_std = tuple(_float("vision", "image_std", s)
                               for s in _sequence("vision.image_std", self.image_std, "a list of numbers"))
        _flags("vision", self, "use_cls_token", "pre_layernorm", "attention_bias", "patch_bias")
        _choice("vision", "encoder", self.encoder, VISION_ENCODERS)
        if self.encoder == "tiled":
            self._check_tiling()
        _positive("vision", image_size=self.image_size, patch_size=self.patch_size,
                  num_channels=self.num_channels, hidden_size=self.hidden_size,
                  num_heads=self.num_heads, intermediate_size=self.intermediate_size)
        if not is_integer(self.num_layers) or self.num_layers < 0:
            raise ConfigError(f"vision.num_layers={self.num_layers!r}: expected an integer >= 0")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.patch_size={self.patch_size} does not divide vision.image_size={self.image_size}; "
                f"expected a divisor of {self.image_size}"
            )
        _divides("vision", "num_heads", self.num_heads, "hidden_size", self.hidden_size)
        _choice("vision", "hidden_act", self.hidden_act, VISION_ACTIVATIONS)
        if self.num_channels != 3:  # accepted, the model was built, and its first image failed in the convolution
            raise ConfigError(f"vision.num_channels={self.num_channels}: tessera's processor makes RGB images "
                              f"(grayscale, RGBA, CMYK, … converted); expected 3")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if len(value) != self.num_channels:
                raise ConfigError(f"vision.{name}={value!r}: expected {self.num_channels} values, one per channel")
        if any(s <= 0 for s in self.image_std):
            raise ConfigError(f"vision.image_std={self.image_std!r}: expected positive values")

    def _check_tiling(self) -> None:
        self.check_tile_grids()
        if not is_integer(self.num_global_layers) or self.num_global_layers < 0:
            raise ConfigError(f"vision.num_global_layers={self.num_global_layers!r}: expected an integer >= 0")
        if not self.use_cls_token:
            raise ConfigError("vision.use_cls_token=False: the tiled encoder puts a CLS token on every tile; "
                              "expected True")
        self.intermediate_layers = _sequence("vision.intermediate_layers", self.intermediate_layers,
                                             "a list of local block indices")
        bad = [i for i in self.intermediate_layers if not is_integer(i) or not 0 <= i < self.num_layers]
        if bad:
            raise ConfigError(f"vision.intermediate_layers={self.intermediate_layers!r}: index {bad[0]!r} is out of "
                              f"range; expected local block indices in 0..{self.num_layers - 1}")

    def check_tile_grids(self) -> None:
        """max_num_tiles and supported_aspect_ratios, which any tiling reads."""
        _positive("vision", max_num_tiles=self.max_num_tiles)
        if self.supported_aspect_ratios is not None:
            check_grid_list("vision.supported_aspect_ratios", self.supported_aspect_ratios, "max_num_tiles",
                             self.max_num_tiles)

    @property
    def aspect_ratios(self) -> list[list[int]]:
        """Tile grids the tiled encoder (or the hybrid's tiling) knows; aspect-ratio id i + 1 is grid i (0 is
        padding)."""
        if self.supported_aspect_ratios is not None:
            return [list(r) for r in self.supported_aspect_ratios]
        n = self.max_num_tiles
        return [[a, b] for a in range(1, n + 1) for b in range(1, n + 1) if a * b <= n]

    @property
    def feature_width(self) -> int:
        """Channels of one tiled-encoder feature: the global output and every kept local output."""
        return self.hidden_size * (1 + len(self.intermediate_layers))

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
    sliding_window: int | None = None  # Mistral: a token attends to itself and the sliding_window - 1 before it
    # None or {"rope_type": "default"}; Llama 3.1's {"rope_type": "llama3", factor, low_freq_factor,
    # high_freq_factor, original_max_position_embeddings} stretches the low frequencies for long contexts.
    rope_scaling: dict[str, Any] | None = None
    # Input-embedding rows past vocab_size: ids the model reads but never predicts (Llama 3.2 Vision's <|image|>).
    num_extra_embeddings: int = 0
    # The transformers decoder family it was imported as, exported as again; None: the one its switches imply. Only
    # the name differs where they overlap: a Mistral without a sliding window is a Llama.
    family: str | None = None

    def __post_init__(self) -> None:
        self.rms_norm_eps = _float("text", "rms_norm_eps", self.rms_norm_eps)
        self.rope_theta = _float("text", "rope_theta", self.rope_theta)
        _flags("text", self, "tie_word_embeddings", "attention_bias")
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
        if self.sliding_window is not None:
            _positive("text", sliding_window=self.sliding_window)
        if not is_integer(self.num_extra_embeddings) or self.num_extra_embeddings < 0:
            raise ConfigError(f"text.num_extra_embeddings={self.num_extra_embeddings!r}: expected an integer >= 0")
        if self.tie_word_embeddings and self.num_extra_embeddings:
            raise ConfigError("text.tie_word_embeddings=True with text.num_extra_embeddings > 0: a tied LM head must "
                              "have as many rows as the embedding table; expected one of them off")
        if self.family is not None:
            _choice("text", "family", self.family, TEXT_FAMILIES)
        if self.rope_scaling is not None:
            self._check_rope_scaling()

    def _check_rope_scaling(self) -> None:
        scaling = self.rope_scaling
        if not isinstance(scaling, dict):
            raise ConfigError(f"text.rope_scaling={scaling!r}: expected null or an object with 'rope_type'")
        _choice("text", "rope_scaling.rope_type", scaling.get("rope_type"), ROPE_TYPES)
        if scaling["rope_type"] == "llama3":
            missing = [key for key in LLAMA3_ROPE_KEYS if key not in scaling]
            if missing:
                raise ConfigError(f"text.rope_scaling: rope_type 'llama3' needs a number for {missing[0]!r}; "
                                  f"expected all of {', '.join(LLAMA3_ROPE_KEYS)}")
            for key in LLAMA3_ROPE_KEYS:  # a factor of 0 makes every frequency infinite: NaN rotations, silently
                value = scaling[key]
                if not is_number(value) or not 0 < value < math.inf:
                    raise ConfigError(f"text.rope_scaling.{key}={value!r}: expected a positive finite number")

    @property
    def embedding_rows(self) -> int:
        return self.vocab_size + self.num_extra_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class FusionConfig:
    """How image features reach the LLM.

    method="unified" (Method A): projected image tokens replace `<image>` slots in the token sequence.
    method="cross" (Method B): projected image features are keys/values of gated cross-attention blocks that run
    before the decoder layers listed in `cross_attention_layers` (None: every 4th layer, as in Llama 3.2).
    method="hybrid" (NVLM-H): each image is cut into high-resolution tiles beside a thumbnail of the whole; the
    thumbnail's features replace `<image>` slots as in Method A, the tiles' are the keys/values of Method B's blocks.
    With cross_attention_placement="replace" a block takes the place of its decoder layer instead (Llama 3.2
    Vision's layout: the layer at that index is a cross-attention layer, not a self-attention one).
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
    cross_attention_placement: str = "before"
    # A token that may see no image (text before the first one): "skip" adds nothing; "attend_all" is Llama 3.2
    # Vision's rule — its attention mask is lifted (it attends to every key of its sample's images, padding tiles
    # included) and only its MLP branch is zeroed; a sample without images gets nothing.
    cross_attention_blind_rows: str = "skip"

    def __post_init__(self) -> None:
        _choice("fusion", "method", self.method, FUSION_METHODS)
        _flags("fusion", self, "projector_bias")
        _choice("fusion", "projector", self.projector, PROJECTORS)
        _choice("fusion", "vision_feature_select_strategy", self.vision_feature_select_strategy, SELECT_STRATEGIES)
        _choice("fusion", "cross_attention_scope", self.cross_attention_scope, CROSS_ATTENTION_SCOPES)
        _choice("fusion", "cross_attention_placement", self.cross_attention_placement, CROSS_ATTENTION_PLACEMENTS)
        _choice("fusion", "cross_attention_blind_rows", self.cross_attention_blind_rows, CROSS_ATTENTION_BLIND_ROWS)
        layers = self.vision_feature_layer
        if isinstance(layers, (list, tuple)):
            if not layers or not all(is_integer(i) for i in layers):
                raise ConfigError(f"fusion.vision_feature_layer={layers!r}: expected an int or a non-empty list of ints")
            self.vision_feature_layer = list(layers)
        elif not is_integer(layers):
            raise ConfigError(f"fusion.vision_feature_layer={layers!r}: expected an int or a non-empty list of ints")
        if self.cross_attention_layers is not None:
            layers = _sequence("fusion.cross_attention_layers", self.cross_attention_layers,
                               "a list of layer indices or null")
            if not all(is_integer(i) for i in layers):
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
    stop_token_ids: list[int] = field(default_factory=list)  # more ids that end generation (Llama 3's <|eot_id|>)

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = _build(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _build(TextConfig, self.text, "text")
        if isinstance(self.fusion, str):  # ModelConfig(fusion="cross") is the switch the article describes
            self.fusion = FusionConfig(method=self.fusion)
        elif isinstance(self.fusion, dict):
            self.fusion = _build(FusionConfig, self.fusion, "fusion")
        for name, part in (("vision", VisionConfig), ("text", TextConfig), ("fusion", FusionConfig)):
            if not isinstance(getattr(self, name), part):  # "fusion": null in a hand-edited config.json
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected an object of {part.__name__} fields")
        for name in ("image_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            # eos must be predictable; the image and pad tokens only need an embedding row
            rows = self.text.vocab_size if name == "eos_token_id" else self.text.embedding_rows
            if not is_integer(value) or not 0 <= value < rows:
                raise ConfigError(f"{name}={value!r}: expected a token id in 0..{rows - 1}")
        for name in ("pad_token_id", "eos_token_id"):  # an image token that is also pad or EOS miscounts images
            if getattr(self, name) == self.image_token_id:
                raise ConfigError(f"{name}={getattr(self, name)} is also image_token_id: the image token marks where "
                                  f"image features go, so it must be a token of its own")
        self.stop_token_ids = _sequence("stop_token_ids", self.stop_token_ids, "a list of token ids")
        bad = [i for i in self.stop_token_ids if not is_integer(i) or not 0 <= i < self.text.vocab_size]
        if bad:
            raise ConfigError(f"stop_token_ids={self.stop_token_ids!r}: {bad[0]!r} is not a token id in "
                              f"0..{self.text.vocab_size - 1}")
        if self.fusion.method == "hybrid":
            if self.vision.encoder != "vit":  # the tiles need an encoder that places patches, and one image size
                raise ConfigError(f"fusion.method='hybrid' with vision.encoder={self.vision.encoder!r}: the hybrid "
                                  f"encodes a thumbnail and tiles with one ViT; expected vision.encoder='vit'")
            self.vision.check_tile_grids()
        if self.vision.encoder == "none" and self.fusion.method != "unified":
            # raw patches carry no position, and cross-attention adds none: the image would be an unordered set
            raise ConfigError(f"vision.encoder='none' with fusion.method={self.fusion.method!r}: raw patches have no "
                              f"positions but the LLM's own, which cross-attention does not give them; expected "
                              f"fusion.method='unified' (Fuyu's design)")
        if self.vision.encoder == "tiled" and self.fusion.method != "cross":
            raise ConfigError(f"vision.encoder='tiled' with fusion.method={self.fusion.method!r}: the tiled encoder "
                              f"feeds cross-attention; expected fusion.method='cross'")
        num_states = self.vision.num_layers + 1  # the embedding output, then one per block
        for index in self.fusion.feature_layers if self.vision.encoder != "none" else ():  # no layers to pick
            if not -num_states <= index < num_states:
                raise ConfigError(
                    f"fusion.vision_feature_layer={self.fusion.vision_feature_layer!r}: index {index} is out of range "
                    f"for a {self.vision.num_layers}-layer encoder; expected -{num_states}..{num_states - 1}"
                )
        if self.fusion.vision_feature_select_strategy == "default" and not self.vision.use_cls_token \
                and self.vision.encoder != "none":
            raise ConfigError(
                "fusion.vision_feature_select_strategy='default' drops the CLS token but vision.use_cls_token is "
                "False; expected 'full'"
            )
        if self.fusion.method in ("cross", "hybrid"):
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
                    f"expected at least one index in 0..{self.text.num_layers - 1} for fusion.method="
                    f"{self.fusion.method!r}"
                )

    def check(self) -> ModelConfig:
        """Every field checked again, as when the config was made: a field set since (config.fusion.method =
        "cross") is checked only here. Returns the config."""
        for part in (self.vision, self.text, self.fusion):
            if dataclasses.is_dataclass(part):  # anything else: __post_init__ names it
                part.__post_init__()
        self.__post_init__()
        return self

    @property
    def cross_attention_layers(self) -> list[int]:
        """Decoder layers preceded by a gated cross-attention block (Method B, hybrid); empty for Method A."""
        if self.fusion.method == "unified":
            return []
        if self.fusion.cross_attention_layers is None:
            return list(range(3, self.text.num_layers, 4))
        return list(self.fusion.cross_attention_layers)

    @property
    def tiled_images(self) -> bool:
        """Do images reach cross-attention as tiles (Llama 3.2 Vision's encoder, the hybrid's high-resolution
        tiles)? Their keys then come in one run per tile slot, vision.max_num_tiles per image."""
        return self.vision.encoder == "tiled" or self.fusion.method == "hybrid"

    @property
    def num_feature_tokens(self) -> int:
        """Image feature vectors per image after CLS selection (tiled: every tile's CLS + patches; encoder-free:
        the patches)."""
        if self.vision.encoder == "tiled":
            return self.vision.max_num_tiles * (self.vision.num_patches + 1)
        if self.vision.encoder == "none":
            return self.vision.num_patches
        keep_cls = self.vision.use_cls_token and self.fusion.vision_feature_select_strategy == "full"
        return self.vision.num_patches + int(keep_cls)

    @property
    def image_feature_width(self) -> int:
        """Channels of the encoder output the projector reads."""
        if self.vision.encoder == "tiled":
            return self.vision.feature_width
        if self.vision.encoder == "none":  # a patch's raw pixels
            return self.vision.num_channels * self.vision.patch_size**2
        return self.vision.hidden_size * len(self.fusion.feature_layers)

    @property
    def image_seq_length(self) -> int:
        """How many `<image>` tokens stand for one image in the text: the feature count for Method A (the
        thumbnail's for the hybrid), one marker for Method B (whose features enter through cross-attention)."""
        return 1 if self.fusion.method == "cross" else self.num_feature_tokens

    # --- JSON round trip -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, nested as in config.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """A config from a dict such as to_dict gives (missing fields take their defaults), every field checked;
        errors name `source` (a file, say) and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        return _build(cls, data, source)

    def save(self, path: str | Path) -> None:
        """Written as JSON (config.json in a checkpoint), whole or not at all; its directory is made if needed."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_whole(Path(path), json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        """A config.json, read and checked."""
        path = Path(path)
        try:
            data = read_json_object(path)
        except FileNotFoundError:
            # most often a run's directory given for its checkpoint: say where the checkpoint is
            inside = path.parent / "checkpoint" / path.name
            hint = f" ({inside.parent}?)" if inside.is_file() else ""
            raise ConfigError(f"{path}: no such config file{hint}; expected a checkpoint directory holding "
                              f"{path.name} (save_pretrained writes one; a training run's is OUT/checkpoint)") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a directory; expected a config file ({path / 'config.json'}?)") from None
        try:
            return cls.from_dict(data, source=str(path))
        except ConfigError as e:  # a nested field's fault names its key path only (text.hidden_size=…): add the file
            message = str(e)
            raise ConfigError(message if message.startswith(f"{path}: ") else f"{path}: {message}") from None


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r}; expected one of {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None
