"""Both fusion methods, and Method A without an encoder (Fuyu), can learn to read an image: the loss on a fixed batch
of 8 image/question/answer samples falls below 0.05 within a bounded number of steps."""

import pytest
import torch
from PIL import Image, ImageDraw

from tessera import ModelConfig, MultimodalLM, Processor, train_tokenizer
from tests.conftest import tiny_config

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
           "purple": (140, 40, 170), "orange": (250, 140, 0), "black": (10, 10, 10), "white": (245, 245, 245)}
MAX_STEPS = 300


def _samples():
    samples = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        image = Image.new("RGB", (16, 16), (128, 128, 128))
        ImageDraw.Draw(image).rectangle([2 + i % 3, 3, 12, 13], fill=rgb)
        messages = [{"role": "user", "content": "<image>\nWhat colour is the square?"},
                    {"role": "assistant", "content": f"The square is {name}."}]
        samples.append((messages, image))
    return samples


@pytest.mark.parametrize("fusion", ["unified", "cross", "encoder-free"])
def test_loss_on_a_fixed_batch_falls_below_0_05(fusion):
    samples = _samples()
    tokenizer = train_tokenizer([m[1]["content"] + " " + m[0]["content"] for m, _ in samples] * 4, vocab_size=300)
    base = tiny_config("unified" if fusion == "encoder-free" else fusion, cross_attention_layers=[0, 2])
    if fusion == "encoder-free":  # Fuyu: raw patches, projected straight into the LLM
        base.vision.encoder = "none"
    config = ModelConfig.from_dict({**base.to_dict(), "text": {**base.to_dict()["text"], "vocab_size": 320}})
    processor = Processor.for_model(config, tokenizer)
    batch = processor([m for m, _ in samples], [[image] for _, image in samples])
    model = MultimodalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(MAX_STEPS):
        loss = model(**batch).loss
        losses.append(loss.item())
        if loss.item() < 0.05:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"{fusion}: {len(losses)} steps, loss {losses[0]:.3f} → {losses[-1]:.4f}")
    assert losses[-1] < 0.05, f"{fusion}: loss {losses[-1]:.3f} after {len(losses)} steps (start {losses[0]:.3f})"
    # the answers really come from the image: greedy decoding names every colour
    prompts = processor([m[:1] for m, _ in samples], [[image] for _, image in samples],
                        add_generation_prompt=True, padding_side="left")
    result = model.generate(**prompts, max_new_tokens=16, tokenizer=processor)
    assert result.texts == [f"The square is {name}." for name in COLOURS]
