"""MultimodalLM: image encoder → projector → decoder LLM, joined by Method A (unified), Method B (cross) or
NVLM-H's hybrid of the two.

    model = MultimodalLM(ModelConfig(fusion="cross"))
    out = model(**batch)                       # logits, and the loss when labels are given
    result = model.generate(**prompt_batch, max_new_tokens=32)
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tessera.checkpoint import CONFIG_NAME, load_dtype, load_weights, parameters_on_meta, save_weights
from tessera.config import ModelConfig, is_integer
from tessera.errors import CheckpointError, ConfigError, DataError, ImageTokenMismatchError
from tessera.fusion.cross_attention import GatedCrossAttentionBlock, image_visibility, pack_images
from tessera.fusion.hybrid import TilePositions, split_thumbnail_and_tiles
from tessera.fusion.projector import Projector
from tessera.fusion.unified import check_image_token_counts, infer_image_counts, merge_image_features
from tessera.generation import SamplingParams, StopChecker, TokenChooser, token_ids
from tessera.text.cache import KVCache
from tessera.text.decoder import DecoderLLM, padding_moved_to_the_front
from tessera.vision.encoder import VisionEncoder, deepest_layer, select_image_features
from tessera.vision.patch_embedding import RawPatches
from tessera.vision.tiled import TiledVisionEncoder
from tessera.vision.tiling import real_tiles

IGNORE_INDEX = -100
COMPONENTS = ("vision", "projector", "llm", "cross_attention")


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (batch, seq, vocab); None for a loss computed without them (see forward)
    loss: torch.Tensor | None = None
    num_tokens: int = 0  # supervised (label != -100) tokens behind the loss

    def __getitem__(self, key: str | int):
        """out["loss"] as out.loss; out[0] the first of (loss, logits) that is set — transformers' outputs' ways,
        which code written for them uses."""
        if isinstance(key, str):
            if key not in ("logits", "loss", "num_tokens"):
                raise KeyError(key)
            return getattr(self, key)
        return tuple(value for value in (self.loss, self.logits) if value is not None)[key]


@dataclass
class GenerationOutput:
    sequences: list[list[int]]  # new token ids per sample, without the EOS token
    finish_reasons: list[str]  # "stop" (EOS or a stop string) or "length"
    texts: list[str] | None = None  # decoded and cut at the first stop string, when a tokenizer was given


def check_token_ids(input_ids: torch.Tensor, rows: int) -> None:
    """input_ids must be a (batch, length) tensor of ids with an embedding row each: a single row of ids, an
    empty prompt or an id past the table failed deep inside (an unpacking, a reshape, an IndexError)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise DataError(f"input_ids of shape {shape}: expected a (batch, length) tensor of at least one token "
                        f"(input_ids[None] makes one prompt a batch)")
    if input_ids.numel() and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < rows:
        raise DataError(f"input_ids hold {int(input_ids.min())}..{int(input_ids.max())}: expected token ids in "
                        f"0..{rows - 1} (the model's embedding rows); was the text made by another tokenizer?")


def whole_counts(image_counts) -> list[int]:
    """image_counts (a list, numpy's or torch's integers) as ints: int(1.7) read 1.7 images as 1."""
    counts = image_counts.tolist() if isinstance(image_counts, torch.Tensor) else list(image_counts)
    try:
        counts = [operator.index(c) for c in counts]
    except TypeError:  # 1.7, "1"
        counts = None
    if counts is None or any(c < 0 for c in counts):
        raise ImageTokenMismatchError(f"image_counts={list(image_counts)}: expected a whole number of images, 0 or "
                                      f"more, per sample")
    return counts


class MultimodalLM(nn.Module):
    """A multimodal LLM: a vision encoder (ViT, Llama 3.2 Vision's tiled one, or none: Fuyu's raw patches), a
    projector and a decoder LLM, joined as config.fusion.method says — "unified" (Method A: the projected image
    features take the places of the image tokens in the LLM's input), "cross" (Method B: gated cross-attention
    blocks inside the LLM read them) or "hybrid" (NVLM-H: a thumbnail's features in the input, the high-resolution
    tiles' through the gated blocks).

    model(input_ids, attention_mask, pixel_values, image_counts) gives the logits; with labels=..., the loss over
    the answer tokens (and the logits only if return_logits=True asks for them). model.generate(...) continues
    prompts; the components ("vision", "projector", "llm", "cross_attention") freeze and unfreeze by name for staged
    training. Build one from a ModelConfig, or load one with from_pretrained (a tessera checkpoint, or a Hugging Face
    LLaVA / Llama 3.2 Vision directory)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ConfigError(f"MultimodalLM({config!r}): expected a ModelConfig (ModelConfig.from_dict makes one of a "
                              f"dict, ModelConfig.load of a config.json)")
        self.config = config.check()  # fields set after the config was made are checked too
        fusion = config.fusion
        encoders = {"vit": VisionEncoder, "tiled": TiledVisionEncoder, "none": RawPatches}
        self.vision = encoders[config.vision.encoder](config.vision)
        self.projector = Projector(config.image_feature_width, config.text.hidden_size, fusion.projector,
                                   fusion.projector_bias)
        if fusion.method == "hybrid":  # part of the projector: it trains (and is frozen) with it
            self.projector.tile_positions = TilePositions(len(config.vision.aspect_ratios),
                                                          config.vision.max_num_tiles, config.text.hidden_size)
        replaced = config.cross_attention_layers if fusion.cross_attention_placement == "replace" else ()
        self.llm = DecoderLLM(config.text, replaced_layers=replaced)
        # Method B's gated blocks, keyed by the decoder layer they run before (or replace); empty for Method A.
        attend_all = fusion.cross_attention_blind_rows == "attend_all"
        self.cross_attention = nn.ModuleDict(
            {str(i): GatedCrossAttentionBlock(config.text, attend_all) for i in config.cross_attention_layers}
        )
        self._decode_step: Callable[..., ModelOutput] | None = None  # the compiled decode step, see compile()

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (the LLM's embedding's: every component has the same)."""
        return self.llm.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.llm.embed_tokens.weight.device

    # --- images ------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """(N, C, H, W) pixels → (N, S, text width) projected image features. A tiled encoder takes
        (N, max_num_tiles, C, H, W) tiles and each image's aspect-ratio id, and gives S = tiles × tokens per tile;
        the hybrid takes (N, 1 + max_num_tiles, C, H, W), a thumbnail and the tiles, and gives S = (1 +
        max_num_tiles) × tokens per tile, zeros for the padding tiles (which are not encoded)."""
        if self.config.fusion.method == "hybrid":
            return self._encode_thumbnails_and_tiles(pixel_values, aspect_ratio_ids)
        if self.config.vision.encoder == "tiled":
            ratio_ids = self._aspect_ratio_ids(aspect_ratio_ids, pixel_values.shape[0])
            features = self.vision(pixel_values.to(self.dtype), ratio_ids)
            return self.projector(features).flatten(1, 2)
        if pixel_values.dim() != 4:  # else the patch convolution's error, naming none of this
            raise DataError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, channels, height, "
                            f"width) for fusion.method={self.config.fusion.method!r}; tiled images (images, tiles, "
                            f"...) come from the processor of a hybrid or Llama 3.2 Vision model")
        if self.config.vision.encoder == "none":  # Fuyu: the projector embeds the raw patches
            return self.projector(self.vision(pixel_values.to(self.dtype)))
        return self.projector(self._vit_features(pixel_values))

    def _vit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) pixels → the ViT features the projector reads (fusion.vision_feature_layer's blocks)."""
        fusion, layers = self.config.fusion, self.config.fusion.feature_layers
        num_layers = self.config.vision.num_layers
        hidden = self.vision(pixel_values.to(self.dtype), up_to_layer=deepest_layer(layers, num_layers))
        drop_cls = fusion.vision_feature_select_strategy == "default"
        return select_image_features(hidden, layers, num_layers, drop_cls)

    def _encode_thumbnails_and_tiles(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor | None
                                     ) -> torch.Tensor:
        """The hybrid's images: every thumbnail and real tile through the ViT in one batch, the padding tiles
        skipped (an image of one tile would otherwise pay for max_num_tiles)."""
        slots = 1 + self.config.vision.max_num_tiles
        if pixel_values.dim() != 5 or pixel_values.shape[1] != slots:
            raise DataError(f"pixel_values of shape {tuple(pixel_values.shape)}: the hybrid expects (images, {slots}, "
                            f"channels, height, width), a thumbnail and vision.max_num_tiles="
                            f"{slots - 1} tile slots per image, as the processor makes them")
        images = pixel_values.shape[0]
        ratio_ids = self._aspect_ratio_ids(aspect_ratio_ids, images)
        real = torch.cat([torch.ones(images, 1, dtype=torch.bool, device=pixel_values.device),
                          self._tile_mask(ratio_ids)], dim=1)
        features = self.projector(self._vit_features(pixel_values[real]))
        placed = features.new_zeros(images, slots, *features.shape[1:])
        placed[real] = features
        tiles = self.projector.tile_positions(placed[:, 1:], ratio_ids) * real[:, 1:, None, None]  # padding stays 0
        return torch.cat([placed[:, :1], tiles], dim=1).flatten(1, 2)

    def _aspect_ratio_ids(self, aspect_ratio_ids: torch.Tensor | None, num_images: int) -> torch.Tensor:
        """Tiled images' aspect-ratio ids, one per image, checked: a missing, miscounted or unknown id would
        otherwise fail deep inside (or, one too many, mark the wrong tiles real without a word)."""
        if aspect_ratio_ids is None:
            raise DataError("aspect_ratio_ids: tiled images need each image's aspect-ratio id; expected the "
                            "processor's aspect_ratio_ids beside pixel_values (or image_features)")
        ids = aspect_ratio_ids.reshape(-1)
        if ids.numel() != num_images:
            raise DataError(f"aspect_ratio_ids holds {ids.numel()} ids for {num_images} images; expected one per "
                            f"image")
        most = len(self.config.vision.aspect_ratios)
        least = 1 if self.config.fusion.method == "hybrid" else 0  # the tiled encoder's 0 is a padding image
        if ids.numel() and not bool(((ids >= least) & (ids <= most)).all()):
            raise DataError(f"aspect_ratio_ids={ids.tolist()}: expected ids in {least}..{most} "
                            f"(vision.aspect_ratios)")
        return ids

    def _tile_mask(self, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """(images, max_num_tiles) bool: which tile slots of each image hold part of it."""
        if self.config.vision.encoder == "tiled":
            return self.vision.tile_mask(aspect_ratio_ids)
        return real_tiles(aspect_ratio_ids, self.config.vision.aspect_ratios, self.config.vision.max_num_tiles)

    # --- forward -----------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        image_features: torch.Tensor | None = None,
        num_items_in_batch: int | None = None,
        logits_to_keep: int = 0,
        aspect_ratio_ids: torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> ModelOutput:
        """pixel_values holds every image of the batch in order (sample 0's images first); image_counts says how
        many belong to each sample (read off the `<image>` tokens when omitted). image_features may replace
        pixel_values when the images are already encoded. With a cache, only the first call (prefill) takes images.
        Tiled images (Llama 3.2 Vision's encoder, the hybrid's tiles) also need aspect_ratio_ids, one per image (with
        image_features too: they say which tiles are real).

        The loss is summed over supervised tokens and divided by their count — or by num_items_in_batch, the count
        over all micro-batches of an accumulated step, so every token weighs the same. With labels, the LM head
        runs only where a label needs it (image, prompt and padding positions make up most of a multimodal
        training sequence, and a large vocabulary makes the head a big share of the step); the output's logits are
        then None unless return_logits=True asks for all of them.
        """
        if not is_integer(logits_to_keep) or logits_to_keep < 0:  # -1 kept all rows but the first two
            raise ConfigError(f"logits_to_keep={logits_to_keep!r}: expected the number of last rows to keep, or 0 "
                              f"for all")
        prefill = cache is None or cache.length == 0
        if prefill and not torch.compiler.is_compiling():  # decode steps feed the tokens generate chose
            check_token_ids(input_ids, self.config.text.embedding_rows)
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected {tuple(input_ids.shape)} like input_ids")
        inputs_embeds, cross = self._embed(input_ids, pixel_values, image_counts, cache, image_features,
                                           aspect_ratio_ids, prefill)
        inject = self._bind_cross(*cross) if cross is not None else None
        supervised = None
        if labels is not None and not return_logits:  # token t predicts label t+1
            supervised = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
        logits = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          cache=cache, inject=inject,
                          logits_to_keep=supervised if supervised is not None else logits_to_keep)
        if labels is None:
            return ModelOutput(logits)
        return self._loss(logits, labels, num_items_in_batch, supervised)

    def _embed(self, input_ids, pixel_values, image_counts, cache, image_features, aspect_ratio_ids, prefill: bool
               ) -> tuple[torch.Tensor, tuple | None]:
        """The input embeddings (Method A: with the image features in the image tokens' places) and, for Method B,
        what its blocks attend to: (keys/values per block, which image groups each token sees, which are real), or
        None when no block has anything to add."""
        if image_features is None and pixel_values is not None and pixel_values.shape[0] > 0 and prefill:
            image_features = self.encode_images(pixel_values, aspect_ratio_ids)
        inputs_embeds = self.llm.embed_tokens(input_ids)
        if prefill:
            num_images = 0 if image_features is None else image_features.shape[0]
            per_image = self.config.image_seq_length
            if image_counts is None:  # read them off the image tokens (none at all: every placeholder is unmatched)
                image_counts = infer_image_counts(input_ids, self.config.image_token_id, per_image) \
                    if num_images else [0] * input_ids.shape[0]
            image_counts = whole_counts(image_counts)
            method = self.config.fusion.method
            in_sequence = image_features
            if num_images and method == "hybrid":  # the thumbnails go in the sequence, the tiles to cross-attention
                in_sequence, image_features = split_thumbnail_and_tiles(image_features, per_image,
                                                                        self.config.vision.max_num_tiles)
            unified = num_images and method != "cross"
            check_image_token_counts(input_ids, self.config.image_token_id, per_image, image_counts, num_images,
                                     in_sequence.shape[1] if unified else None)
            if unified:
                inputs_embeds = merge_image_features(inputs_embeds, input_ids, in_sequence,
                                                     self.config.image_token_id)
        cross = None
        if self.config.fusion.method != "unified":
            cross = self._cross_state(input_ids, image_features, image_counts, cache, prefill, aspect_ratio_ids)
        return inputs_embeds, cross

    def _cross_state(self, input_ids, image_features, image_counts, cache, prefill, aspect_ratio_ids
                     ) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor] | None:
        """Each gated block's image keys/values, which images (or image tiles) each token may see (batch, tokens,
        groups) and which are the sample's own (batch, groups); None if there are no images.

        At prefill the keys/values are computed once and stored in the cache; decode steps reuse them, and a new
        token sees the images the last prompt token saw."""
        state = cache.cross if cache is not None else None
        if prefill:
            if image_features is None or image_features.shape[0] == 0:
                return None  # no image in the batch: every block would add exactly zero
            images, real = pack_images(image_features, image_counts)
            visible = image_visibility(input_ids, self.config.image_token_id, images.shape[1],
                                       self.config.fusion.cross_attention_scope,
                                       self.config.image_seq_length) & real[:, None, :]
            if self.config.tiled_images:  # a token sees the real tiles of the images it sees
                ratio_ids = self._aspect_ratio_ids(aspect_ratio_ids, image_features.shape[0])
                tiles, _ = pack_images(self._tile_mask(ratio_ids), image_counts)
                visible = (visible[..., None] & tiles[:, None]).flatten(2)
                if self.config.vision.encoder == "tiled":  # transformers' Mllama: every tile slot of a real image,
                    real = real.repeat_interleave(tiles.shape[-1], dim=-1)  # padding too (an attend_all row sees it)
                else:  # the hybrid's padding slots are zeros no row may attend to
                    real = (real[..., None] & tiles).flatten(1)
            keys_values = {int(i): block.image_keys_values(images) for i, block in self.cross_attention.items()}
            if state is not None:
                state.keys_values, state.visible, state.real = keys_values, visible[:, -1], real
            return keys_values, visible, real
        if not state.keys_values:
            return None
        return state.keys_values, state.visible[:, None, :].expand(-1, input_ids.shape[1], -1), state.real

    def _bind_cross(self, keys_values, visible, real) -> dict[int, Callable[[torch.Tensor], torch.Tensor]]:
        """Each gated block bound to its image keys/values and to what each token may see."""
        return {
            int(i): partial(block, keys=keys_values[int(i)][0], values=keys_values[int(i)][1], visible=visible,
                            real=real)
            for i, block in self.cross_attention.items()
        }

    def prefill_in_chunks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: KVCache,
                          chunk: int, pixel_values: torch.Tensor | None = None,
                          image_counts: torch.Tensor | list[int] | None = None,
                          aspect_ratio_ids: torch.Tensor | None = None, image_features: torch.Tensor | None = None
                          ) -> Iterator[torch.Tensor | None]:
        """The prompt's prefill `chunk` tokens at a time, into the empty `cache`: yields None after each chunk but the
        last, then the last position's logits (batch, vocab). A server runs its other rows' decode steps between
        chunks, so that a long prompt does not stall them for its whole prefill (chunked prefill, as vLLM's).

        The images are encoded (or their image_features taken, as forward takes them) and placed once, before the
        first chunk; each chunk attends to the cache and to itself, as the whole prompt would (the logits agree
        with one prefill's to float rounding). A size sent to the generator (`send(n)`) sets the chunks after: a
        server with no rows left to decode runs the rest at once. (A server's Prefill encodes the images itself, in
        advances of their own when they take more than a chunk: see tessera/serve/batch.py.)"""
        if chunk < 1:
            raise ValueError(f"chunk={chunk}: expected at least 1 token")
        if cache.length:
            raise ValueError(f"the cache holds {cache.length} tokens; a prefill starts from an empty one")
        inputs_embeds, cross = self._embed(input_ids, pixel_values, image_counts, cache, image_features,
                                           aspect_ratio_ids, prefill=True)
        del pixel_values, image_features  # placed (or made keys/values): not held through the chunks
        length, start = input_ids.shape[1], 0
        while start < length:
            end = min(start + chunk, length)
            inject = self._bind_cross(cross[0], cross[1][:, start:end], cross[2]) if cross is not None else None
            logits = self.llm(inputs_embeds=inputs_embeds[:, start:end], cache=cache, inject=inject,
                              attention_mask=None if attention_mask is None else attention_mask[:, :end],
                              logits_to_keep=1)
            resized = yield logits[:, -1] if end == length else None
            chunk, start = resized or chunk, end

    def _loss(self, logits, labels, num_items_in_batch, supervised) -> ModelOutput:
        """logits: (batch, seq, vocab), or (supervised positions, vocab) in order when `supervised` marks them."""
        targets = labels[:, 1:]  # token t predicts token t+1
        vocab = self.config.text.vocab_size
        outside = (targets != IGNORE_INDEX) & ((targets < 0) | (targets >= vocab))
        if bool(outside.any()):  # else torch's IndexError ("Target -1 is out of bounds") from inside the loss
            raise DataError(f"labels hold {int(targets[outside][0])}: expected token ids in 0..{vocab - 1} "
                            f"(text.vocab_size={vocab}) or {IGNORE_INDEX} for positions that are not learned")
        num_tokens = int((targets != IGNORE_INDEX).sum())
        if num_items_in_batch is None:
            if num_tokens == 0:
                # a label in the first column is never a target: no token comes before it to predict it
                first = " past the first column (which no token predicts)" if (labels[:, :1] != IGNORE_INDEX).any() \
                    else ""
                raise DataError(
                    f"labels: every label{first} is -100, so there is no answer token to learn from and the loss "
                    f"would be a silent 0; expected at least one supervised token (was the answer cut off by the "
                    f"length limit?)"
                )
            num_items_in_batch = num_tokens
        elif num_items_in_batch <= 0:  # the divisor: 0 would make the loss inf, or NaN (0/0), silently
            raise ValueError(f"num_items_in_batch={num_items_in_batch}: expected the positive count of supervised "
                             f"tokens over the accumulated step")
        if supervised is not None:
            loss = F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX], reduction="sum")
            return ModelOutput(None, loss / num_items_in_batch, num_tokens)
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch
        return ModelOutput(logits, loss, num_tokens)

    # --- generation --------------------------------------------------------------------------------------------
    # inference_mode, not no_grad: it also skips the version counters and view tracking every operator would keep
    # for autograd. A batch-1 decode step runs ~390 operators, mostly small, and that bookkeeping took 8–9% of it
    # (13.3 → 12.3 ms on the benchmark LLM). Nothing it makes escapes as a tensor except what the streamer is
    # handed, which is made outside inference mode (see below)
    @torch.inference_mode()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_counts: torch.Tensor | list[int] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_strings: list[str] | tuple[str, ...] = (),
        eos_token_id: int | list[int] | None = None,
        tokenizer=None,
        use_cache: bool = True,
        aspect_ratio_ids: torch.Tensor | None = None,
        suppress_token_ids: Sequence[int] | None = None,
        streamer=None,
        **ignored,
    ) -> GenerationOutput:
        """Continue each (left-padded) prompt. temperature 0 is greedy; seed makes sampling reproducible.
        tokenizer (anything with .decode(ids)) is needed for stop_strings and to return texts.
        suppress_token_ids: tokens never generated; None means the image and pad tokens, () none at all (as
        transformers' generate).
        streamer: anything with put(ids) and end(), as transformers' streamers (TextStreamer, TextIteratorStreamer):
        it gets the prompt's ids, then every step's new tokens as they are chosen (pad_token_id for a row that has
        stopped), then end()."""
        ignored.pop("labels", None)  # a training batch may be passed as **batch
        if ignored:
            raise TypeError(f"generate() got unexpected arguments: {', '.join(sorted(ignored))}")
        check_token_ids(input_ids, self.config.text.embedding_rows)
        if attention_mask is None and bool((input_ids == self.config.pad_token_id).any()):
            # as transformers warns: a padded batch without its mask reads the padding as text, and answers otherwise
            warnings.warn(f"input_ids hold the pad token (id {self.config.pad_token_id}) but no attention_mask was "
                          f"given, so the padding is read as text; pass the processor's attention_mask",
                          stacklevel=2)
        params = self.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, seed=seed, stop_strings=tuple(stop_strings),
                                      eos_token_id=eos_token_id, suppress_token_ids=suppress_token_ids)
        decode = tokenizer.decode if tokenizer is not None else None
        checker = StopChecker(input_ids.shape[0], params, decode)
        steps = self.stream_tokens(input_ids, attention_mask, pixel_values, image_counts, params, use_cache,
                                   aspect_ratio_ids=aspect_ratio_ids)
        try:
            if streamer is not None:
                streamer.put(input_ids.cpu())
            for tokens in steps:
                if streamer is not None:  # as transformers' generate: a row that has stopped gets pad tokens
                    stopped = torch.tensor([reason is not None for reason in checker.finish_reasons])
                    # made outside inference mode, an ordinary tensor: an inference tensor refuses in-place writes
                    # and autograd there, so a streamer that kept it could not use it as any other tensor
                    with torch.inference_mode(False):
                        streamer.put(tokens.cpu().masked_fill(stopped, self.config.pad_token_id))
                checker.add(tokens.tolist())
                if checker.all_done:
                    break
        except BaseException:
            # the streamer still ends, so a consumer waiting on it (a TextIteratorStreamer's thread, a server's
            # response) finishes with what was streamed instead of waiting forever; transformers' generate leaves
            # it waiting. The error raised is generation's own, not one the streamer's end() may add
            if streamer is not None:
                with contextlib.suppress(Exception):
                    streamer.end()
            raise
        finally:
            steps.close()
        checker.finish()
        if streamer is not None:
            streamer.end()
        texts = [checker.text(i) for i in range(len(checker.tokens))] if decode else None
        return GenerationOutput(checker.tokens, checker.finish_reasons, texts)

    def sampling_params(self, eos_token_id: int | Sequence[int] | None = None,
                        suppress_token_ids: Sequence[int] | None = None, **settings) -> SamplingParams:
        """SamplingParams (max_new_tokens, temperature, top_k, top_p, seed, stop_strings) with this model's EOS
        and stop tokens (eos_token_id=[] never stops on EOS) and the tokens it must never generate filled in."""
        eos = (self.config.eos_token_id, *self.config.stop_token_ids) if eos_token_id is None \
            else self._output_ids("eos_token_id", eos_token_id)
        suppress = self._never_generated() if suppress_token_ids is None \
            else self._output_ids("suppress_token_ids", suppress_token_ids)
        params = SamplingParams(**settings, eos_token_ids=eos, suppress_token_ids=suppress)
        params.check_vocabulary(self.config.text.vocab_size)
        return params

    def _output_ids(self, name: str, value) -> tuple[int, ...]:
        """An id or ids (a list, a tensor) of tokens this model can generate. A string, or an id past the vocabulary,
        would otherwise never match a generated token: generation would silently never stop on it."""
        vocab = self.config.text.vocab_size
        ids = token_ids(value)
        if ids is None or not all(0 <= i < vocab for i in ids):
            raise ConfigError(f"{name}={value!r}: expected a token id or a list of them, each in 0..{vocab - 1} "
                              f"(text.vocab_size={vocab}); a tokenizer's token_to_id gives a token's id")
        return ids

    def _never_generated(self) -> tuple[int, ...]:
        stops = {self.config.eos_token_id, *self.config.stop_token_ids}  # a pad token that also ends generation
        special = {self.config.image_token_id, self.config.pad_token_id} - stops
        return tuple(sorted(i for i in special if i < self.config.text.vocab_size))  # extra rows: never predicted

    def stream_tokens(self, input_ids, attention_mask, pixel_values, image_counts,
                      params: SamplingParams | Sequence[SamplingParams], use_cache: bool = True,
                      aspect_ratio_ids: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every sample, step by step (the caller decides when to stop).

        params is one SamplingParams for the batch or one per row (a server batching unrelated requests); with
        one per row, the longest max_new_tokens sets the number of steps. Images are encoded once. With the cache,
        the prompt is run once (prefill) and each step feeds one token; without it, each step recomputes the whole
        sequence (the slow reference the cache is tested against)."""
        batch, prompt_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        input_ids, attention_mask = padding_moved_to_the_front(input_ids, attention_mask)
        choose = TokenChooser(params, batch, self.device, self.config.text.vocab_size)
        max_new_tokens = choose.max_new_tokens
        if prompt_len + max_new_tokens > self.config.text.max_position_embeddings:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"text.max_position_embeddings={self.config.text.max_position_embeddings}"
            )
        image_features = None
        if pixel_values is not None and pixel_values.shape[0] > 0:
            image_features = self.encode_images(pixel_values, aspect_ratio_ids)
        next_position = attention_mask.long().sum(-1, keepdim=True)
        cache = KVCache(self.config.text, batch, prompt_len + max_new_tokens, self.dtype, self.device) \
            if use_cache else None
        sequence, mask = input_ids, attention_mask
        logits = self(input_ids, attention_mask, image_counts=image_counts, image_features=image_features,
                      cache=cache, logits_to_keep=1, aspect_ratio_ids=aspect_ratio_ids).logits[:, -1]
        for _ in range(max_new_tokens):
            tokens = choose(logits)
            yield tokens
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
            if use_cache:
                step = self._decode_step or self
                logits = step(tokens[:, None], mask, position_ids=next_position, cache=cache).logits[:, -1]
                next_position = next_position + 1
            else:
                sequence = torch.cat([sequence, tokens[:, None]], dim=-1)
                logits = self(sequence, mask, image_counts=image_counts, image_features=image_features,
                              logits_to_keep=1, aspect_ratio_ids=aspect_ratio_ids).logits[:, -1]

    # --- torch.compile (opt-in) ------------------------------------------------------------------------------------
    def compile(self, **options) -> MultimodalLM:
        """Opt in to torch.compile (off by default); `options` go to torch.compile (e.g. backend, mode). Returns
        self. What it buys: inductor fuses the small elementwise ops around the matmuls (norms, RoPE, SwiGLU,
        residuals, gates) and cuts per-op Python dispatch, which is most of a small model's decode step.

        Compiled, each as one graph (fullgraph=True: a graph break is an error here, not a silent slowdown):
        - the generation decode step: the whole forward of the new tokens through the KV cache;
        - the vision encoder (ViT, tiled, or the encoder-free raw patches);
        - the decoder's layer stack with Method B's blocks (`DecoderLLM.run_layers`).
        The rest of a prefill or training forward stays eager around them: it checks the image-token counts, works
        out which image each token sees and which positions carry a label — data-dependent Python that would break
        any graph. The first calls compile (seconds); a changed shape (cache length, batch) recompiles once with
        dynamic sizes."""
        self.vision.compile(fullgraph=True, **options)
        self.llm.run_layers = torch.compile(self.llm.run_layers, fullgraph=True, **options)
        self._decode_step = torch.compile(self.forward, fullgraph=True, **options)
        return self

    # --- staged training: freezing components ------------------------------------------------------------------
    def component(self, name: str) -> nn.Module:
        """One of COMPONENTS by name: "vision", "projector", "llm" or "cross_attention" (empty for Method A)."""
        if name not in COMPONENTS:
            raise ConfigError(f"component {name!r}: expected one of {', '.join(map(repr, COMPONENTS))}")
        return getattr(self, name)

    def freeze(self, *names: str) -> None:
        """Stop training these components (their weights keep requires_grad=False)."""
        for name in names:
            self.component(name).requires_grad_(False)

    def unfreeze(self, *names: str) -> None:
        """Train these components (requires_grad=True on their weights)."""
        for name in names:
            self.component(name).requires_grad_(True)

    def parameter_counts(self) -> dict[str, dict[str, int]]:
        """{component: {"total": n, "trainable": n}}, each shared (tied) tensor counted once."""
        counts = {}
        for name in COMPONENTS:
            unique = {id(p): p for p in self.component(name).parameters()}.values()
            counts[name] = {"total": sum(p.numel() for p in unique),
                            "trainable": sum(p.numel() for p in unique if p.requires_grad)}
        return counts

    # --- checkpoints -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """config.json and the weights (model.safetensors; sharded with an index when large) into `directory`,
        made if needed; returns it. The processor saves the tokenizer and its settings beside them."""
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():  # else mkdir's FileExistsError, naming nothing useful
            raise CheckpointError(f"{directory}: a file; expected a directory to save the checkpoint into")
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory / CONFIG_NAME)
        save_weights(self, directory)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str | None = None) -> MultimodalLM:
        """A tessera checkpoint or a Hugging Face LLaVA / Llama 3.2 Vision directory. dtype: the weights' dtype in
        memory, a torch dtype or one of LOAD_DTYPES' names; None (or "auto") keeps a tessera checkpoint's stored
        dtype and loads a Hugging Face directory in float32."""
        if isinstance(dtype, str):
            dtype = load_dtype(dtype)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ConfigError(f"dtype={dtype!r}: expected a floating-point torch dtype (torch.float32, torch.bfloat16, "
                              f"torch.float16) or its name")
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"{directory}: no such checkpoint directory; expected one written by "
                                  f"save_pretrained (config.json + model.safetensors)")
        from tessera.interop.hub_files import is_hf_checkpoint

        if is_hf_checkpoint(directory):  # a Hugging Face LLaVA / Llama 3.2 Vision directory: convert on the fly
            from tessera.interop.convert import load_hf_model

            model = load_hf_model(directory, dtype)  # loaded straight into dtype: a 7B model is held once
        else:  # tessera's own: built without weights, then filled with the stored ones
            config = ModelConfig.load(directory / CONFIG_NAME)
            with parameters_on_meta():
                model = cls(config)
            load_weights(model, directory, dtype)  # in dtype, or as stored (a bf16 conversion stays bf16)
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()
