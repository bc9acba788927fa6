"""Fine-tuning a pretrained whole model (`init_checkpoint:` in the run config): a tiny random transformers LLaVA or
Llama 3.2 Vision, or a tessera checkpoint a run wrote, trained by a recipe on the shapes data; what it is refused
beside; resuming such a run; the result exported back to transformers."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from tessera import ConfigError, MultimodalLM, Processor
from tessera.cli import main
from tessera.data.shapes import make_shapes_dataset
from tessera.train.run import RunConfig, run_training
from tests.test_interop import ATOL, _llava, _mllama, hf_tokenizer  # noqa: F401 (hf_tokenizer: a fixture)
from tests.test_train import TINY_MODEL

transformers = pytest.importorskip("transformers")
from transformers import LlavaForConditionalGeneration  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from tessera.interop.export import export_hf  # noqa: E402


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(directory, train=24, test=4, seed=0, text_train=8, text_test=4)
    return directory


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, hf_tokenizer):  # noqa: F811
    torch.manual_seed(0)
    crop = CLIPImageProcessorPil(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return _llava(tmp_path_factory.mktemp("hf"), hf_tokenizer, "llava", {"model_type": "clip_vision_model"},
                  {"model_type": "llama"}, crop, vision_feature_layer=-2).directory


def _run(shapes, out, checkpoint, **fields) -> dict:
    config = {"recipe": "llava", "data": str(shapes), "out": str(out), "init_checkpoint": str(checkpoint),
              "steps": {"align": 2, "instruct": 2}, "batch_size": 4, **fields}
    return run_training(RunConfig.from_dict(config), log=quiet, progress=False)


def _weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_a_transformers_llava_fine_tunes_and_exports_with_the_same_logits(shapes, llava_dir, tmp_path):
    result = _run(shapes, tmp_path / "run", llava_dir)
    # no text or encoder pretraining: the recipe's stages only, from the checkpoint's weights
    assert list(result["final_losses"]) == ["align", "instruct"] and result["steps"] == 4
    assert result["text_loss_before"] is not None and result["text_loss_after"] != result["text_loss_before"]
    before = MultimodalLM.from_pretrained(llava_dir)
    after = MultimodalLM.from_pretrained(tmp_path / "run" / "checkpoint")
    assert after.config == before.config
    changed = {name for name, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[name])}
    assert changed and not any(name.startswith("vision.") for name in changed)  # the llava recipe never trains it
    # the checkpoint's own processor — its chat template and image token — encoded the data, and is saved
    processor = Processor.from_pretrained(tmp_path / "run" / "checkpoint")
    assert processor.image_token == "<image>" and processor.config.chat_template
    assert processor.config.max_length == 256

    exported = export_hf(tmp_path / "run" / "checkpoint", tmp_path / "hf")
    theirs = LlavaForConditionalGeneration.from_pretrained(exported, attn_implementation="eager").eval()
    batch = processor([[{"role": "user", "content": "<image>\nWhat colour is the circle?"},
                        {"role": "assistant", "content": "red"}]], images=[[shapes / "images" / "train_00000.png"]])
    with torch.no_grad():
        ours = after(batch["input_ids"], pixel_values=batch["pixel_values"]).logits
        got = theirs(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    assert (got - ours).abs().max() <= ATOL
    # and the commands take it as they take any checkpoint
    checkpoint = str(tmp_path / "run" / "checkpoint")
    assert main(["generate", "--checkpoint", checkpoint, "--image", str(shapes / "images" / "test_00000.png"),
                 "--prompt", "What colour is the circle?", "--max-new-tokens", "3"]) == 0
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(shapes / "test.json"), "--limit", "2",
                 "--max-new-tokens", "3"]) == 0


def test_a_tessera_checkpoint_fine_tunes_from_the_weights_it_saved(shapes, tmp_path):
    first = run_training(RunConfig.from_dict({
        "recipe": "llava", "data": str(shapes), "out": str(tmp_path / "first"), "model": TINY_MODEL,
        "steps": {"text": 2, "encoder_pretrain": 1, "align": 1, "instruct": 2}, "batch_size": 4,
        "vocab_size": 300}), log=quiet, progress=False)
    saved = tmp_path / "first" / "checkpoint"
    # stored in bf16 (as `tessera convert --dtype bfloat16` writes), trained in float32
    bf16 = tmp_path / "bf16"
    first["model"].to(torch.bfloat16).save_pretrained(bf16)
    first["processor"].save_pretrained(bf16)
    # lr 0: a step that changes nothing, so the weights it ends with are the weights it started from
    again = _run(shapes, tmp_path / "again", saved, steps={"align": 1, "instruct": 0}, lr={"align": 0.0})
    assert list(again["final_losses"]) == ["align", "instruct"]
    assert _weights(tmp_path / "again" / "checkpoint").keys() == _weights(saved).keys()
    for name, tensor in _weights(tmp_path / "again" / "checkpoint").items():
        assert torch.equal(tensor, _weights(saved)[name]), name
    assert again["processor"].tokenizer.to_str() == first["processor"].tokenizer.to_str()
    from_bf16 = _run(shapes, tmp_path / "from-bf16", bf16, steps={"align": 1, "instruct": 1})
    assert {p.dtype for p in from_bf16["model"].parameters()} == {torch.float32}
    assert {t.dtype for t in _weights(tmp_path / "from-bf16" / "checkpoint").values()
            if t.is_floating_point()} == {torch.float32}


def test_a_resumed_fine_tune_continues_from_its_own_checkpoint(shapes, llava_dir, tmp_path):
    whole = _run(shapes, tmp_path / "run", llava_dir)
    final = _weights(tmp_path / "run" / "checkpoint")
    # taken back to the end of its first stage: the continuation reads the run's weights, not init_checkpoint's
    stage = tmp_path / "run" / "checkpoints" / "stage-0-align"
    again = run_training(RunConfig.from_dict({
        "recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"), "init_checkpoint": str(llava_dir),
        "steps": {"align": 2, "instruct": 2}, "batch_size": 4}), log=quiet, progress=False, resume=stage)
    assert again["resumed_at"] == 2 and again["final_losses"]["instruct"] == whole["final_losses"]["instruct"]
    for name, tensor in _weights(tmp_path / "run" / "checkpoint").items():
        assert torch.equal(tensor, final[name]), name
    # another init_checkpoint is another run
    other = shutil.copytree(llava_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match=re.escape(f"init_checkpoint ('{llava_dir}' in the checkpoint, "
                                                    f"'{other}' now)")):
        run_training(RunConfig.from_dict({
            "recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"), "init_checkpoint": str(other),
            "steps": {"align": 2, "instruct": 2}, "batch_size": 4}), log=quiet, progress=False, resume=stage)


def test_a_transformers_llama_vision_fine_tunes_with_the_llama_3_2_recipe(shapes, tmp_path, hf_tokenizer):  # noqa: F811
    torch.manual_seed(0)
    directory = _mllama(tmp_path, hf_tokenizer).directory
    result = run_training(RunConfig.from_dict({
        "recipe": "llama3.2", "data": str(shapes), "out": str(tmp_path / "run"), "init_checkpoint": str(directory),
        "steps": {"pretrain": 1, "finetune": 1}, "batch_size": 2}), log=quiet, progress=False)
    assert list(result["final_losses"]) == ["pretrain", "finetune"]
    assert all(torch.isfinite(torch.tensor(loss)) for loss in result["final_losses"].values())
    after = MultimodalLM.from_pretrained(tmp_path / "run" / "checkpoint")
    assert after.config.fusion.method == "cross"
    assert Processor.from_pretrained(tmp_path / "run" / "checkpoint").image_token == "<|image|>"
    # the source's sampling settings, which tessera does not read, go on into the checkpoints and the export
    sampling = json.loads((directory / "generation_config.json").read_text()) | {"temperature": 0.25}
    (directory / "generation_config.json").write_text(json.dumps(sampling))
    run_training(RunConfig.from_dict({
        "recipe": "llama3.2", "data": str(shapes), "out": str(tmp_path / "again"), "init_checkpoint": str(directory),
        "steps": {"pretrain": 1, "finetune": 0}, "batch_size": 2}), log=quiet, progress=False)
    for saved in ("checkpoint", "checkpoints/stage-0-pretrain"):
        assert json.loads((tmp_path / "again" / saved / "generation_config.json").read_text()) == sampling
    exported = export_hf(tmp_path / "again" / "checkpoint", tmp_path / "hf")
    assert json.loads((exported / "generation_config.json").read_text())["temperature"] == 0.25


@pytest.mark.parametrize("fields, words", [
    ({"llm_checkpoint": "llm"}, "llm_checkpoint=llm with init_checkpoint {ck}: the whole model's LLM is in the "
                                "checkpoint already; expected one of init_checkpoint and llm_checkpoint"),
    ({"model": "tiny"}, "model='tiny' with init_checkpoint {ck}: the model is the checkpoint's"),
    ({"vocab_size": 512}, "vocab_size=512 with init_checkpoint {ck}:"),
    ({"pretrain_encoder": True}, "pretrain_encoder=true with init_checkpoint {ck}:"),
    ({"fusion": "cross", "recipe": "llama3.2"}, "fusion='cross': init_checkpoint {ck} is a 'unified' model; "
                                                "expected fusion: unified or no fusion"),
    ({"recipe": "llama3.2"}, "recipe='llama3.2' trains fusion 'cross' but init_checkpoint {ck} is a 'unified' "
                             "model; expected a recipe of fusion unified (llava,"),
    ({"steps": {"text": 5, "align": 1}}, "steps.text=5 with init_checkpoint {ck}: a pretrained whole model skips "
                                         "the encoder_pretrain and text stages"),
    ({"steps": {"encoder_pretrain": 5}}, "steps.encoder_pretrain=5 with init_checkpoint {ck}:"),
    ({"max_length": 4096}, "max_length=4096 exceeds the model's text.max_position_embeddings=2048"),
])
def test_what_an_init_checkpoint_is_refused_beside_is_named(llava_dir, fields, words):
    with pytest.raises(ConfigError, match=re.escape(words.format(ck=llava_dir))):
        RunConfig.from_dict({"recipe": "llava", "data": "d", "init_checkpoint": str(llava_dir), **fields})


def test_an_encoder_free_checkpoint_runs_a_recipe_whose_encoder_only_stage_has_0_steps(tmp_path):
    """The error for qwen2-vl on an encoder-free model advises steps.encoder: 0; from a pretrained whole model that
    advice then failed as "no stage 'encoder'" (the skipped stages' names were overwritten)."""
    from tessera.train.run_config import build_stages
    from tests.conftest import tiny_config

    config = tiny_config()
    config.vision.encoder = "none"
    MultimodalLM(config).save_pretrained(tmp_path / "fuyu")
    run = RunConfig.from_dict({"recipe": "qwen2-vl", "data": "d", "init_checkpoint": str(tmp_path / "fuyu"),
                               "steps": {"encoder": 0, "joint": 2}})
    assert [stage.name for stage in build_stages(run)] == ["joint", "instruct"]
    with pytest.raises(ConfigError, match="stage 'encoder' trains only the encoder"):  # not given 0 steps
        build_stages(dataclasses.replace(run, steps={"joint": 2}))


def test_settings_of_the_skipped_stages_may_stay(llava_dir):
    run = RunConfig.from_dict({"recipe": "llava", "data": "d", "init_checkpoint": str(llava_dir),
                               "steps": {"text": 0, "align": 3}, "lr": {"text": 1e-3}})
    assert run.model is None and run.vocab_size is None
    assert RunConfig.from_dict({"recipe": "llava", "data": "d"}).model == "tiny"


def test_an_init_checkpoint_that_is_not_one_is_named(shapes, llava_dir, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"init_checkpoint={tmp_path / 'nope'}: no such directory; "
                                                    f"expected a checkpoint directory")):
        RunConfig.from_dict({"recipe": "llava", "data": "d", "init_checkpoint": str(tmp_path / "nope")})
    (tmp_path / "runs" / "checkpoint").mkdir(parents=True)
    (tmp_path / "runs" / "checkpoint" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(f"init_checkpoint={tmp_path / 'runs'}: no config.json in it "
                                                    f"({tmp_path / 'runs' / 'checkpoint'}?)")):
        RunConfig.from_dict({"recipe": "llava", "data": "d", "init_checkpoint": str(tmp_path / "runs")})
    # a tokenizer beside it must be its own
    other = tmp_path / "other.json"
    tokenizer = Tokenizer.from_file(str(llava_dir / "tokenizer.json"))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save(str(other))
    run = RunConfig.from_dict({"recipe": "llava", "data": str(shapes), "out": str(tmp_path / "run"),
                               "init_checkpoint": str(llava_dir), "tokenizer": str(other)})
    with pytest.raises(ConfigError, match=re.escape(f"tokenizer {other}: not the tokenizer of init_checkpoint "
                                                    f"{llava_dir}")):
        run_training(run, log=quiet, progress=False)
