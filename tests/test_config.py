import dataclasses
import json
import re

import pytest

from tessera import ConfigError, FusionConfig, ModelConfig, TextConfig, VisionConfig
from tests.conftest import tiny_config


def test_json_round_trip(tmp_path):
    config = tiny_config("cross", cross_attention_layers=[1, 3], vision_feature_layer=[-2, -1])
    config.save(tmp_path / "config.json")
    loaded = ModelConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert loaded.cross_attention_layers == [1, 3]


def test_fusion_given_as_a_word():
    assert ModelConfig(fusion="cross").fusion.method == "cross"


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: TextConfig(hidden_size=30, num_heads=4), ["text.num_heads=4", "text.hidden_size=30"]),
        (lambda: TextConfig(num_heads=8, num_kv_heads=3), ["text.num_kv_heads=3", "divisor of 8"]),
        (lambda: VisionConfig(hidden_size=30, num_heads=4), ["vision.num_heads=4"]),
        (lambda: VisionConfig(image_size=30, patch_size=16), ["vision.patch_size=16", "vision.image_size=30"]),
        (lambda: FusionConfig(method="early"), ["fusion.method='early'", "'unified', 'cross'"]),
        (lambda: FusionConfig(projector="qformer"), ["fusion.projector", "'linear', 'mlp'"]),
        (lambda: FusionConfig(vision_feature_select_strategy="cls"), ["vision_feature_select_strategy"]),
        (lambda: VisionConfig(hidden_act="relu"), ["vision.hidden_act", "'gelu'"]),
        (lambda: TextConfig(vocab_size=0), ["text.vocab_size=0", "positive integer"]),
        # accepted, it built a model whose first image failed in the patch embedding's convolution
        (lambda: VisionConfig(num_channels=1, image_mean=[0.5], image_std=[0.5]),
         ["vision.num_channels=1", "processor makes RGB images", "expected 3"]),
    ],
)
def test_invalid_values_name_field_and_allowed(build, words):
    with pytest.raises(ConfigError) as error:
        build()
    for word in words:
        assert word in str(error.value)


def test_cross_attention_layer_out_of_range():
    with pytest.raises(ConfigError, match=r"cross_attention_layers.*index 9.*0\.\.3"):
        tiny_config("cross", cross_attention_layers=[1, 9])


def test_default_cross_attention_layers_every_fourth():
    config = tiny_config("cross")
    assert config.cross_attention_layers == [3]
    big = dataclasses.replace(config, text=dataclasses.replace(config.text, num_layers=16))
    assert big.cross_attention_layers == [3, 7, 11, 15]
    assert tiny_config("unified").cross_attention_layers == []


def test_feature_layer_out_of_range():
    with pytest.raises(ConfigError, match="vision_feature_layer"):
        tiny_config("unified", vision_feature_layer=-4)  # a 2-layer encoder has 3 hidden states


def test_default_strategy_needs_cls():
    with pytest.raises(ConfigError, match="use_cls_token"):
        ModelConfig(vision=VisionConfig(use_cls_token=False))


def test_load_reports_file_and_unknown_field(tmp_path):
    data = tiny_config().to_dict()
    data["text"]["num_experts"] = 8
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as error:
        ModelConfig.load(path)
    assert str(error.value).count(str(path)) == 1 and "num_experts" in str(error.value)
    path.write_text(json.dumps({**tiny_config().to_dict(), "experts": 8}))  # a top-level field: the file once too
    with pytest.raises(ConfigError) as error:
        ModelConfig.load(path)
    assert str(error.value).startswith(f"{path}: unknown field 'experts'") and str(error.value).count(str(path)) == 1
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.load(path)
    with pytest.raises(ConfigError, match="no such config file; expected a checkpoint directory holding "
                                          "missing.json"):
        ModelConfig.load(tmp_path / "missing.json")
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)  # a run's directory given for its checkpoint
    (tmp_path / "run" / "checkpoint" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(f"no such config file ({tmp_path / 'run' / 'checkpoint'}?)")):
        ModelConfig.load(tmp_path / "run" / "config.json")


def test_token_ids_inside_vocab():
    with pytest.raises(ConfigError, match="image_token_id=500"):
        ModelConfig(image_token_id=500, text=TextConfig(vocab_size=100))


@pytest.mark.parametrize("field", ["pad_token_id", "eos_token_id"])
def test_the_image_token_is_a_token_of_its_own(field):
    with pytest.raises(ConfigError, match=f"{field}=3 is also image_token_id"):
        ModelConfig(image_token_id=3, **{field: 3})


def test_numbers_written_without_a_dot_are_numbers_and_others_are_errors():
    """YAML 1.1 reads 1e-5 as the string "1e-5"; a config written by hand must still mean the number."""
    text = TextConfig(rms_norm_eps="1e-5", rope_theta="5e5")
    assert text.rms_norm_eps == 1e-5 and text.rope_theta == 5e5
    assert VisionConfig(layer_norm_eps="1e-6").layer_norm_eps == 1e-6
    with pytest.raises(ConfigError, match="text.rms_norm_eps='tiny': expected a positive number"):
        TextConfig(rms_norm_eps="tiny")
    with pytest.raises(ConfigError, match="vision.image_std"):
        VisionConfig(image_std=(0.5, 0.0, 0.5))


@pytest.mark.parametrize("section, field", [
    ("vision", "use_cls_token"), ("vision", "pre_layernorm"), ("vision", "attention_bias"), ("vision", "patch_bias"),
    ("text", "tie_word_embeddings"), ("text", "attention_bias"), ("fusion", "projector_bias"),
])
def test_a_true_false_field_given_as_a_string_is_an_error_not_true(section, field):
    # "false" is a truthy string: accepted, it would silently turn the setting on
    data = tiny_config().to_dict()
    data[section][field] = "false"
    with pytest.raises(ConfigError, match=rf"{section}\.{field}='false': expected true or false"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("section, field, value", [
    ("vision", "layer_norm_eps", float("inf")), ("text", "rms_norm_eps", "inf"), ("text", "rope_theta", "nan"),
    ("vision", "image_std", [float("inf")] * 3), ("vision", "image_mean", [0.5, float("-inf"), 0.5]),
])
def test_an_infinite_or_nan_number_is_an_error_naming_the_field(section, field, value):
    data = tiny_config().to_dict()
    data[section][field] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{field}=.*expected a finite"):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("section, field, value, expected", [
    ("vision", "image_mean", 0.5, "vision.image_mean=0.5: expected a list of numbers"),
    ("vision", "image_std", None, "vision.image_std=None: expected a list of numbers"),
    ("fusion", "cross_attention_layers", 3, "fusion.cross_attention_layers=3: expected a list of layer indices"),
    (None, "stop_token_ids", 5, "stop_token_ids=5: expected a list of token ids"),
    (None, "image_token_id", True, "image_token_id=True: expected a token id"),
    ("vision", "num_layers", True, "vision.num_layers=True: expected an integer >= 0"),
    ("text", "num_extra_embeddings", False, "text.num_extra_embeddings=False: expected an integer >= 0"),
])
def test_a_wrong_typed_field_is_an_error_naming_it(section, field, value, expected):
    # a lone number where a list goes failed as "vision: 'float' object is not iterable"; true passed as id 1
    data = tiny_config("cross").to_dict()
    (data[section] if section else data)[field] = value
    with pytest.raises(ConfigError) as error:
        ModelConfig.from_dict(data)
    assert expected in str(error.value)


def test_a_field_set_after_the_config_was_made_is_checked_when_the_model_is_built():
    """Building the model is where a config's edits take effect: config.fusion.method = "cross" on a 2-layer text
    model built a Method B model with no cross-attention layer (images ignored), whose checkpoint then failed to
    load; a width that no longer divides failed deep inside a forward."""
    from tessera import MultimodalLM

    config = tiny_config()
    config.text.num_layers, config.fusion.method = 2, "cross"
    with pytest.raises(ConfigError, match=r"fusion.cross_attention_layers resolves to \[\]"):
        MultimodalLM(config)
    config = tiny_config()
    config.text.hidden_size = 30
    with pytest.raises(ConfigError, match="text.num_heads=4 does not divide text.hidden_size=30"):
        MultimodalLM(config)
    config = tiny_config()
    config.fusion = "cross"  # the switch ModelConfig(fusion="cross") takes works as an edit too
    assert MultimodalLM(config).config.fusion.method == "cross"
    with pytest.raises(ConfigError, match=r"MultimodalLM\(\{'fusion': 'cross'\}\): expected a ModelConfig"):
        MultimodalLM({"fusion": "cross"})
