"""Review findings on the model core: each test pins a defect that was found and fixed."""

import pytest
import torch

from tessera.config import ModelConfig
from tessera.model import MultimodalLM

IMG = 3


# --- flops.py: the analytic count against PyTorch's FLOP counter -------------------------------------------
def _tiny_bench_config(fusion: dict, vision: dict | None = None) -> ModelConfig:
    return ModelConfig.from_dict({
        "vision": vision or {"image_size": 64, "patch_size": 16, "hidden_size": 64, "num_layers": 3,
                             "num_heads": 2, "intermediate_size": 256, "pre_layernorm": True},
        "text": {"vocab_size": 256, "hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 172},
        "fusion": fusion})


TILED = {"encoder": "tiled", "image_size": 32, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
         "intermediate_size": 64, "max_num_tiles": 2, "num_global_layers": 1, "intermediate_layers": [0]}


@pytest.mark.parametrize("fusion, vision", [
    ({"method": "cross", "cross_attention_layers": [1], "cross_attention_placement": "replace"}, None),
    ({"method": "cross", "cross_attention_layers": [2], "cross_attention_placement": "replace"}, None),  # the last
    ({"method": "cross", "cross_attention_layers": [1]}, TILED),
])
def test_analytic_flops_count_replaced_layers_and_the_tiled_encoder(fusion, vision, monkeypatch):
    """A layer a cross-attention block replaces is no self-attention layer (it was counted as one), and the tiled
    encoder runs its global blocks over every padded tile slot (they were left out, and its patches miscounted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import tessera.linear
    from tessera.flops import TRAIN, decoder_layer_flops, training_step_flops

    monkeypatch.setattr(tessera.linear, "_OP", None)  # every product through F.linear, which the counter sees
    config = _tiny_bench_config(fusion, vision)
    model = MultimodalLM(config).train()
    batch, labelled, image_tokens, v = 2, 8, config.num_feature_tokens, config.vision
    text = torch.randint(10, 200, (batch, labelled))
    ids = torch.cat([torch.full((batch, 1), 1), torch.full((batch, 1), IMG), text], 1)
    labels = ids.masked_fill(ids == IMG, -100)
    labels[:, :2] = -100
    extra = {}
    if v.encoder == "tiled":
        pixels = torch.randn(batch, v.max_num_tiles, 3, v.image_size, v.image_size)
        extra["aspect_ratio_ids"] = torch.tensor([1, len(v.aspect_ratios)])
    else:
        pixels = torch.randn(batch, 3, v.image_size, v.image_size)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(ids, pixel_values=pixels, image_counts=[1] * batch, labels=labels, **extra).loss.backward()

    sequence, t = ids.shape[1], config.text
    last_replaced = (fusion.get("cross_attention_placement") == "replace"
                     and t.num_layers - 1 in fusion["cross_attention_layers"])
    surplus = 0  # what the implementation spends past the count when it trims the last layer (see test_bench.py)
    if not last_replaced:
        surplus = TRAIN * batch * (decoder_layer_flops(config, sequence, sequence, outputs=labelled + 1)
                                   - decoder_layer_flops(config, sequence, sequence, outputs=labelled)
                                   + (sequence - labelled - 1) * 2 * t.hidden_size * t.num_heads * t.head_dim)
    analytic = training_step_flops(config, batch, image_tokens, sequence, labelled)
    assert counter.get_total_flops() == analytic + surplus


# --- linear.py: the packed copy for batched decoding must follow the weight -------------------------------------
def _packed_layer():
    import tessera.linear as linear_module

    if linear_module.backend() != "onednn":
        pytest.skip("this torch build has no oneDNN linear")
    layer = linear_module.Linear(512, 640).eval()
    with torch.no_grad():
        layer(torch.randn(4, 512))
    assert layer._packed is not None and layer._packed[1] is not None
    return layer


@pytest.mark.parametrize("fused", [True, False])
def test_the_packed_weight_follows_an_optimizer_step_in_eval_mode(fused, monkeypatch):
    """A model without dropout may well train in eval mode, decoding batches between steps. A fused AdamW step
    (tessera's own trainer's optimizer) writes the weights without moving their version counter: the packed copy
    was kept, and decoding multiplied by the weights of before the step."""
    import tessera.linear as linear_module

    monkeypatch.setattr(linear_module, "available_memory", lambda: (1 << 40, 1 << 41))
    layer = _packed_layer()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=fused, foreach=None if fused else False)
    layer(torch.randn(8, 512)).square().sum().backward()
    optimizer.step()
    x = torch.randn(4, 512)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias),
                                   atol=1e-4, rtol=1e-5)


def test_moving_a_layer_drops_its_packed_copy(monkeypatch):
    """`.to(dtype)` or `.to(device)` makes new weights; the copy of the old ones would only take memory."""
    import tessera.linear as linear_module

    monkeypatch.setattr(linear_module, "available_memory", lambda: (1 << 40, 1 << 41))
    layer = _packed_layer()
    layer.to(torch.bfloat16)
    assert layer._packed is None


# --- memory.py: what cannot be read counts as no limit -------------------------------------------------------------
def test_a_cgroup_directory_that_cannot_be_looked_at_counts_as_no_limit(tmp_path, monkeypatch):
    """A sandbox (AppArmor, gVisor) may deny even a stat of /sys/fs/cgroup's directories. Path.is_dir raises
    PermissionError for that (it only swallows 'no such file'), and available_memory — asked before every packed
    copy a decode step makes — raised with it instead of leaving the machine's figures."""
    from pathlib import Path

    from tessera import memory

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    600 kB\n")
    (tmp_path / "self_cgroup").write_text("4:memory:/job\n0::/system.slice/job\n")
    denied = tmp_path / "cgroup"
    (denied / "system.slice" / "job").mkdir(parents=True)
    (denied / "memory").mkdir()
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    monkeypatch.setattr(memory, "PROC_CGROUP", tmp_path / "self_cgroup")
    monkeypatch.setattr(memory, "CGROUP_ROOT", denied)
    stat = Path.stat

    def refusing(path, *args, **kwargs):
        if path.is_relative_to(denied) and path != denied:
            raise PermissionError(13, "Permission denied", str(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", refusing)
    assert memory.available_memory() == (600 * 1024, 1000 * 1024)


# --- config.py: a bad value is a ConfigError naming the field --------------------------------------------------------
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("key, value", [("factor", 0), ("factor", -2.0), ("factor", float("nan")), ("factor", True),
                                        ("low_freq_factor", float("inf")), ("original_max_position_embeddings", 0)])
def test_llama3_rope_scaling_needs_positive_finite_numbers(key, value):
    """factor 0 made every frequency infinite: cos and sin NaN at every position, and the model still returned
    finite (meaningless) logits."""
    from tessera.config import TextConfig
    from tessera.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"text\.rope_scaling\.{key}=.*expected a positive finite number"):
        TextConfig(rope_scaling={**LLAMA3, key: value})
    TextConfig(rope_scaling=LLAMA3)  # the valid one still loads


@pytest.mark.parametrize("ratios", [5, [[1, 2], 3], [[1, True]], [], [[1, 2, 3]], [[0, 1]], [[2, 3]]])
def test_supported_aspect_ratios_of_the_wrong_shape_name_the_field(ratios):
    """A lone number or a non-pair item failed as "'int' object is not iterable"; [] or a bool passed."""
    from tessera.config import VisionConfig
    from tessera.errors import ConfigError

    with pytest.raises(ConfigError, match=r"vision\.supported_aspect_ratios=.*expected a non-empty list of \[rows, "
                                          r"columns\] pairs"):
        VisionConfig(encoder="tiled", max_num_tiles=4, supported_aspect_ratios=ratios)


@pytest.mark.parametrize("part, value", [("fusion", None), ("vision", None), ("text", [1]), ("vision", 3)])
def test_a_config_part_of_the_wrong_type_names_it(part, value, tmp_path):
    """A hand-edited config.json with "fusion": null crashed with AttributeError deep in validation."""
    import json
    import re

    from tessera.errors import ConfigError

    path = tmp_path / "config.json"
    path.write_text(json.dumps({part: value}))
    with pytest.raises(ConfigError, match=re.escape(f"config.json: {part}={value!r}: expected an object")):
        ModelConfig.load(path)


# --- model.py ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, -3])
def test_a_non_positive_num_items_in_batch_is_an_error_not_an_inf_or_nan_loss(count):
    """The loss is divided by num_items_in_batch: 0 gave inf (or 0/0 = NaN) silently."""
    from tests.conftest import tiny_config

    model = MultimodalLM(tiny_config())
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match=f"num_items_in_batch={count}: expected the positive count"):
        model(ids, labels=ids, num_items_in_batch=count)
    assert model(ids, labels=torch.full_like(ids, -100), num_items_in_batch=4).loss.item() == 0  # a micro-batch


def test_a_model_loaded_under_inference_mode_decodes_a_batch(tmp_path, monkeypatch):
    """Weights made under torch.inference_mode() are inference tensors, which have no version counter: the packed
    copy's key read it, and every batched decode step raised "Inference tensors do not track version counter"."""
    import tessera.linear as linear_module
    from tests.conftest import tiny_config

    if linear_module.backend() != "onednn":
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(linear_module, "MIN_WEIGHT_ELEMENTS", 0)  # the tiny model's products take the packed route
    monkeypatch.setattr(linear_module, "MIN_MULTIPLY_ADDS", 0)
    monkeypatch.setattr(linear_module, "available_memory", lambda: (1 << 40, 1 << 41))
    MultimodalLM(tiny_config()).save_pretrained(tmp_path)
    prompts = torch.tensor([[1, 5, 6], [1, 7, 8]])
    expected = MultimodalLM.from_pretrained(tmp_path).generate(prompts, max_new_tokens=4).sequences
    with torch.inference_mode():
        model = MultimodalLM.from_pretrained(tmp_path)
        assert model.generate(prompts, max_new_tokens=4).sequences == expected
        layer = model.llm.layers[0].attn.qkv
        assert layer.packed_weight() is None  # unversioned weights: no copy that could go stale


@pytest.mark.parametrize("side", [20, 12])
def test_unified_images_of_another_size_are_refused_not_misplaced(side):
    """A 20 px image in a 16 px model gives 25 features for 16 slots: the counts of image tokens still matched,
    and masked_scatter filled image 1's slots with image 0's leftover features, silently (a 12 px one failed with
    "Number of elements of source < number of ones in mask")."""
    from tessera import ImageTokenMismatchError
    from tests.conftest import tiny_config

    model = MultimodalLM(tiny_config()).eval()
    ids = torch.tensor([[1] + [IMG] * 16 + [5] + [IMG] * 16 + [6]])
    features = (side // 4) ** 2
    with pytest.raises(ImageTokenMismatchError, match=f"each image gives {features} image features but the text "
                                                      f"holds 16 image tokens per image"):
        model(ids, pixel_values=torch.randn(2, 3, side, side))
    assert model(ids, pixel_values=torch.randn(2, 3, 16, 16)).logits.shape == (1, 35, 96)


def _tiled_model() -> MultimodalLM:
    return MultimodalLM(ModelConfig.from_dict({
        "vision": {"encoder": "tiled", "image_size": 8, "patch_size": 4, "hidden_size": 16, "num_layers": 2,
                   "num_heads": 2, "intermediate_size": 32, "max_num_tiles": 4, "num_global_layers": 1,
                   "intermediate_layers": [0]},
        "text": {"vocab_size": 96, "hidden_size": 32, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 64, "max_position_embeddings": 64},
        "fusion": {"method": "cross", "cross_attention_layers": [1, 3]}})).eval()


@pytest.mark.parametrize("given, ratio_ids, message", [
    ("features", None, "tiled images need each image's aspect-ratio id"),  # was AttributeError on None
    ("pixels", [1], "aspect_ratio_ids holds 1 ids for 2 images"),  # was a RuntimeError from a view
    ("features", [1, 2, 3], "aspect_ratio_ids holds 3 ids for 2 images"),  # was accepted: the wrong tiles real
    ("pixels", [1, 99], r"aspect_ratio_ids=\[1, 99\]: expected ids in 0..8"),  # was 'index out of range in self'
])
def test_the_tiled_encoders_aspect_ratio_ids_are_checked(given, ratio_ids, message):
    from tessera import DataError

    model = _tiled_model()
    pixels = torch.randn(2, 4, 3, 8, 8)
    inputs = {"pixel_values": pixels} if given == "pixels" else {
        "image_features": model.encode_images(pixels, torch.tensor([1, 2]))}
    if ratio_ids is not None:
        inputs["aspect_ratio_ids"] = torch.tensor(ratio_ids)
    with torch.no_grad(), pytest.raises(DataError, match=message):
        model(torch.tensor([[1, IMG, 5, IMG, 6]]), **inputs)
