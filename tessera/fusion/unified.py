"""Method A, the unified embedding decoder: image features take the place of `<image>` tokens in the input
embeddings, and the LLM reads them like any other token."""

from __future__ import annotations

import torch

from tessera.errors import ImageTokenMismatchError


def check_image_token_counts(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int,
                             image_counts: torch.Tensor | list[int], num_images: int,
                             features_per_image: int | None = None) -> None:
    """Every sample must hold exactly image_count × tokens_per_image image tokens; and each image must give
    tokens_per_image features when features_per_image (the encoder's count) is given — pixels of another size
    give another count, and the features would fill the slots of the wrong images."""
    if features_per_image is not None and features_per_image != tokens_per_image:
        raise ImageTokenMismatchError(
            f"each image gives {features_per_image} image features but the text holds {tokens_per_image} image "
            f"tokens per image; expected pixel_values of the encoder's vision.image_size"
        )
    counts = [int(c) for c in image_counts]
    if len(counts) != input_ids.shape[0]:
        raise ImageTokenMismatchError(
            f"image_counts has {len(counts)} entries for a batch of {input_ids.shape[0]} samples"
        )
    if sum(counts) != num_images:
        raise ImageTokenMismatchError(
            f"image_counts adds up to {sum(counts)} images but {num_images} were given (pixel_values)"
        )
    found = (input_ids == image_token_id).sum(-1).tolist()
    for sample, (n_tokens, n_images) in enumerate(zip(found, counts)):
        if n_tokens and not num_images:  # the caller's slip, not the processor's: say which
            raise ImageTokenMismatchError(
                f"sample {sample}: the text has {n_tokens} image tokens but no images were given; expected the "
                f"processor's pixel_values (and image_counts) with its input_ids"
            )
        if n_tokens != n_images * tokens_per_image:
            raise ImageTokenMismatchError(
                f"sample {sample}: the text has {n_tokens} image tokens but its {n_images} image(s) give "
                f"{n_images * tokens_per_image} image features ({tokens_per_image} per image); "
                f"expected the processor to expand each <image> into {tokens_per_image} tokens"
            )


def infer_image_counts(input_ids: torch.Tensor, image_token_id: int, tokens_per_image: int) -> list[int]:
    """Images per sample read off the image tokens, for callers that pass no image_counts."""
    counts = []
    for sample, n_tokens in enumerate((input_ids == image_token_id).sum(-1).tolist()):
        if n_tokens % tokens_per_image:
            raise ImageTokenMismatchError(
                f"sample {sample}: the text has {n_tokens} image tokens, not a multiple of the "
                f"{tokens_per_image} features one image gives"
            )
        counts.append(n_tokens // tokens_per_image)
    return counts


def merge_image_features(inputs_embeds: torch.Tensor, input_ids: torch.Tensor, image_features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Overwrite the image-token embeddings with image features (N, S, D), in batch then position order."""
    slots = (input_ids == image_token_id).unsqueeze(-1)
    return inputs_embeds.masked_scatter(slots, image_features.reshape(-1, inputs_embeds.shape[-1]).to(inputs_embeds.dtype))
