import torch

from tessera.config import VisionConfig
from tessera.vision.encoder import VisionEncoder, deepest_layer, select_image_features
from tessera.vision.patch_embedding import PatchEmbedding, patchify


def test_conv_patch_embedding_equals_flatten_then_linear():
    """The article's two forms of a ViT's first step are the same map."""
    embed = PatchEmbedding(num_channels=3, hidden_size=24, patch_size=4)
    pixels = torch.randn(2, 3, 16, 12)
    by_conv = embed(pixels)
    by_linear = embed.as_linear()(patchify(pixels, 4))
    assert by_conv.shape == (2, 12, 24)
    torch.testing.assert_close(by_conv, by_linear, atol=1e-5, rtol=1e-5)


def test_patchify_order_is_row_major():
    pixels = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)  # batch 2, 2 channels
    patches = patchify(pixels, 2)
    # second patch of the first image = columns 2..3 of rows 0..1, channel 0 first
    assert patches[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]


def _encoder(**overrides):
    config = VisionConfig(image_size=16, patch_size=4, hidden_size=32, num_layers=3, num_heads=2,
                          intermediate_size=64, **overrides)
    return VisionEncoder(config), config


def test_hidden_states_and_cls():
    encoder, config = _encoder()
    hidden = encoder(torch.randn(2, 3, 16, 16))
    assert len(hidden) == config.num_layers + 1
    assert all(h.shape == (2, 17, 32) for h in hidden)  # 16 patches + CLS
    no_cls, _ = _encoder(use_cls_token=False)
    assert no_cls(torch.randn(1, 3, 16, 16))[-1].shape == (1, 16, 32)


def test_feature_layer_selection_like_llava():
    encoder, config = _encoder()
    hidden = encoder(torch.randn(1, 3, 16, 16))
    penultimate = select_image_features(hidden, [-2], config.num_layers, drop_cls=True)
    torch.testing.assert_close(penultimate, hidden[2][:, 1:])
    full = select_image_features(hidden, [-2], config.num_layers, drop_cls=False)
    assert full.shape == (1, 17, 32)
    stacked = select_image_features(hidden, [1, -1], config.num_layers, drop_cls=True)
    torch.testing.assert_close(stacked, torch.cat([hidden[1], hidden[3]], -1)[:, 1:])
    # stopping early gives the same features without running the later blocks
    assert deepest_layer([-2], config.num_layers) == 2
    early = encoder(torch.zeros(1, 3, 16, 16), up_to_layer=2)
    assert len(early) == 3


def test_position_embeddings_interpolate_to_another_size():
    encoder, _ = _encoder()
    same = encoder.position_embeddings_for(4, 4)
    assert same is encoder.position_embedding
    bigger = encoder.position_embeddings_for(8, 6)
    assert bigger.shape == (1, 1 + 48, 32)
    torch.testing.assert_close(bigger[:, 0], encoder.position_embedding[:, 0])  # CLS position untouched
    hidden = encoder(torch.randn(1, 3, 32, 24))
    assert hidden[-1].shape == (1, 49, 32)


def test_the_encoder_free_model_embeds_raw_patches_as_a_vit_s_first_step_does():
    """Fuyu (vision.encoder="none"): no encoder weights; a linear projector over the raw patches is a patch embedding
    straight into the LLM's width — the same map as a Conv2d(kernel = stride = patch) with its weights."""
    from tessera import ModelConfig, MultimodalLM

    config = ModelConfig.from_dict({
        "vision": {"encoder": "none", "image_size": 32, "patch_size": 8},
        "text": {"vocab_size": 64, "hidden_size": 48, "num_layers": 1, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 64},
        "fusion": {"method": "unified", "projector": "linear"}})
    model = MultimodalLM(config)
    assert sum(p.numel() for p in model.vision.parameters()) == 0
    assert (config.num_feature_tokens, config.image_feature_width, config.image_seq_length) == (16, 3 * 8 * 8, 16)
    pixels = torch.randn(2, 3, 32, 32)
    conv = torch.nn.Conv2d(3, 48, kernel_size=8, stride=8)
    with torch.no_grad():
        conv.weight.copy_(model.projector.linear_1.weight.view(48, 3, 8, 8))
        conv.bias.copy_(model.projector.linear_1.bias)
        want = conv(pixels).flatten(2).transpose(1, 2)
        torch.testing.assert_close(model.encode_images(pixels), want, atol=1e-5, rtol=1e-5)
