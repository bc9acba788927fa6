"""`tessera bench --quick` runs and reports every figure (no timing is asserted: the machine is shared)."""

import json
import math
import sys

import pytest

pytest.importorskip("transformers")

from tessera.bench import report, suite  # noqa: E402
from tessera.cli import main  # noqa: E402


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert _finite(results["matmul_gflops"])
    assert results["machine"]["allocator"] and f"memory allocator: {results['machine']['allocator']}" in printed
    speeds = results["matmul_gflops_by_kernel"]  # the peak is the fastest kernel tessera can use
    assert "torch.mm" in speeds and all(map(_finite, speeds.values()))
    assert results["matmul_gflops"] == max(speeds.values())
    measured = results["matmul_gflops_measured"]  # before and after the run; each kernel's better one counts
    assert set(measured) == {"start", "end"}
    assert speeds == {k: max(measured["start"][k], measured["end"][k]) for k in speeds}
    train = results["llava"]["train"]
    assert train["tessera"]["mfu"] == pytest.approx(
        train["flops"] / train["tessera"]["seconds"] / (results["matmul_gflops"] * 1e9))
    assert ("oneDNN" in speeds) == (results["linear_backend"] == "onednn")
    llava = results["llava"]
    for name in ("tessera", "transformers"):
        assert _finite(llava["train"][name]["samples_per_s"]) and _finite(llava["train"][name]["mfu"])
        assert _finite(llava["prefill"][name]["seconds"])
        for batch in map(str, suite.QUICK.decode_batches):
            assert _finite(llava["decode"][batch][name]["tokens_per_s"])
    assert set(results["fusion_scaling"]) == set(map(str, suite.QUICK.scaling_image_tokens))
    for row in results["fusion_scaling"].values():
        for fusion in ("unified", "cross", "hybrid"):
            assert _finite(row[fusion]["seconds"]) and _finite(row[fusion]["flops"]) and _finite(row[fusion]["mfu"])
        assert _finite(row["b_speedup"]) and _finite(row["hybrid_speedup"])
    assert _finite(results["mllama_reference"]["seconds"]) and results["mllama_reference"]["cross_attention_layers"]
    for line in ("training step", "MFU", "prefill", "greedy decode, batch 1", "Method A (unified)", "H faster by",
                 "Mllama", "Targets", "A `--quick` run", "decode batch 2 vs transformers"):
        assert line in printed, line
    assert len(report.targets(results)) == 6


def test_without_transformers_the_bench_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    assert main(["bench", "--quick"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "transformers" in error and "pip install -e '.[bench]'" in error


def test_method_b_needs_fewer_flops_than_method_a_as_the_image_grows():
    """The article's efficiency claim, in the analytic count the benchmark's MFU uses."""
    from tessera.flops import training_step_flops
    from tessera.config import ModelConfig

    def config(fusion):
        return ModelConfig.from_dict({"vision": {"image_size": 512, "pre_layernorm": True},
                                      "fusion": {"method": fusion, "vision_feature_layer": -2}})

    a, b = config("unified"), config("cross")
    ratios = [training_step_flops(a, 1, n, 65, 64) / training_step_flops(b, 1, n, 66, 64) for n in (64, 1024, 4096)]
    assert 1 < ratios[0] < ratios[1] < ratios[2]


@pytest.mark.parametrize("fusion, encoder", [("unified", "vit"), ("cross", "vit"), ("unified", "none")])
def test_analytic_flops_are_the_flops_a_training_step_spends(fusion, encoder, monkeypatch):
    """The MFU's numerator, against PyTorch's FLOP counter over a real step (products through `F.linear` and the
    math attention, which the counter sees). The only surplus allowed: the last layer computes the rows from the
    first labelled one to the end, and the very last row predicts nothing; and its fused projection makes queries
    for every row."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import tessera.linear
    from tessera.flops import TRAIN, decoder_layer_flops, training_step_flops
    from tessera.config import ModelConfig
    from tessera.model import MultimodalLM

    monkeypatch.setattr(tessera.linear, "_OP", None)
    config = ModelConfig.from_dict({
        "vision": {"image_size": 128, "patch_size": 16, "hidden_size": 64, "num_layers": 3, "num_heads": 2,
                   "intermediate_size": 256, "pre_layernorm": True, "encoder": encoder},
        "text": {"vocab_size": 512, "hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 172},
        "fusion": {"method": fusion, "vision_feature_layer": -2, "cross_attention_layers": [1]}})
    torch.manual_seed(0)
    model = MultimodalLM(config).train()
    batch, image_tokens, labelled = 2, 64, 16
    inputs = suite.llava_batch(suite.QUICK, batch, labelled, labelled=True, image_tokens=image_tokens, fusion=fusion)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(**inputs, image_counts=[1] * batch).loss.backward()

    sequence = inputs["input_ids"].shape[1]
    text_tokens = sequence - (image_tokens if fusion == "unified" else 0)  # BOS (and Method B's marker) included
    trailing_row = TRAIN * batch * (decoder_layer_flops(config, sequence, sequence, outputs=labelled + 1)
                                    - decoder_layer_flops(config, sequence, sequence, outputs=labelled))
    t = config.text
    unread_queries = TRAIN * batch * (sequence - labelled - 1) * 2 * t.hidden_size * t.num_heads * t.head_dim
    analytic = training_step_flops(config, batch, image_tokens, text_tokens, labelled)
    assert counter.get_total_flops() == analytic + trailing_row + unread_queries


@pytest.mark.parametrize("fusion", suite.FUSIONS)
def test_the_scaling_table_s_flops_are_what_its_steps_spend(fusion, monkeypatch):
    """The A / B / hybrid table's GFLOP and MFU columns: the bench's own models and batches (the quick sizes),
    against PyTorch's FLOP counter, with the surpluses the test above allows."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import tessera.linear
    from tessera.flops import TRAIN, decoder_layer_flops
    from tessera.model import MultimodalLM

    monkeypatch.setattr(tessera.linear, "_OP", None)
    s, n, batch = suite.QUICK, 64, 1
    config = suite.tessera_config(s, fusion, n)
    torch.manual_seed(0)
    model = MultimodalLM(config).train()
    inputs = suite.llava_batch(s, batch, s.text_tokens, labelled=True, image_tokens=n, fusion=fusion)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(**inputs, image_counts=[1] * batch).loss.backward()

    sequence, labelled = inputs["input_ids"].shape[1], s.text_tokens
    trailing_row = TRAIN * batch * (decoder_layer_flops(config, sequence, sequence, outputs=labelled + 1)
                                    - decoder_layer_flops(config, sequence, sequence, outputs=labelled))
    t = config.text
    unread_queries = TRAIN * batch * (sequence - labelled - 1) * 2 * t.hidden_size * t.num_heads * t.head_dim
    analytic = suite.scaling_step_flops(s, config, n, batch)  # what the table reports
    assert counter.get_total_flops() == analytic + trailing_row + unread_queries
    with pytest.raises(ValueError, match="even number of patches"):
        suite.tessera_config(s, "hybrid", 49)


TILED = {"encoder": "tiled", "image_size": 32, "patch_size": 16, "hidden_size": 32, "num_layers": 2, "num_heads": 2,
         "intermediate_size": 64, "max_num_tiles": 2, "num_global_layers": 1, "intermediate_layers": [0]}


@pytest.mark.parametrize("fusion, vision", [
    ({"method": "unified", "vision_feature_layer": -2}, None),
    ({"method": "cross", "cross_attention_layers": [0, 2]}, None),
    ({"method": "cross", "cross_attention_layers": [1], "cross_attention_placement": "replace"}, TILED),
    ({"method": "unified"}, {"encoder": "none", "image_size": 64, "patch_size": 16}),
])
def test_an_images_worth_in_prompt_tokens_is_what_its_encoding_and_a_tokens_prefill_spend(fusion, vision,
                                                                                        monkeypatch):
    """The ratio a server's chunked prefill spreads its work by (image_cost_in_tokens), against PyTorch's FLOP
    counter: encoding an image (and Method B's keys and values of it), and the LLM's products for prompt tokens
    (with every row's output: attention and the LM head taken off by their own count)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import tessera.linear
    from tessera.config import ModelConfig
    from tessera.flops import image_cost_in_tokens, image_encoding_flops, image_keys_values_flops, prompt_token_flops
    from tessera.model import MultimodalLM

    monkeypatch.setattr(tessera.linear, "_OP", None)  # every product through F.linear, which the counter sees
    config = ModelConfig.from_dict({
        "vision": vision or {"image_size": 64, "patch_size": 16, "hidden_size": 64, "num_layers": 3,
                             "num_heads": 2, "intermediate_size": 256, "pre_layernorm": True},
        "text": {"vocab_size": 256, "hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                 "intermediate_size": 172},
        "fusion": fusion})
    model, v, t = MultimodalLM(config).eval(), config.vision, config.text
    if v.encoder == "tiled":
        pixels, extra = torch.randn(1, v.max_num_tiles, 3, v.image_size, v.image_size), torch.tensor([1])
    else:
        pixels, extra = torch.randn(1, 3, v.image_size, v.image_size), None
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        features = model.encode_images(pixels, extra)
    assert counter.get_total_flops() == image_encoding_flops(config)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for block in model.cross_attention.values():
            block.image_keys_values(features[:, None])
    assert counter.get_total_flops() == image_keys_values_flops(config)

    if fusion["method"] == "unified":  # a cross block needs images to run: its count is the training step's
        tokens = 12
        with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            model.llm(inputs_embeds=torch.randn(1, tokens, t.hidden_size), logits_to_keep=0)
        attention = t.num_layers * 4 * tokens * tokens * t.num_heads * t.head_dim
        head = tokens * 2 * t.hidden_size * t.vocab_size
        assert counter.get_total_flops() - attention - head == tokens * prompt_token_flops(config)
    assert image_cost_in_tokens(config) == \
        (image_encoding_flops(config) + image_keys_values_flops(config)) / prompt_token_flops(config)


def test_a_missed_target_never_reads_as_met():
    assert report.target_value(1.2969, 1.3) == "1.296×"  # not "1.30×" beside "missed"
    assert report.target_value(1.3012, 1.3) == "1.30×"
    assert report.target_value(2.4, 2.0) == "2.40×"
    assert report.target_value(0.712, 0.5) == "71.2%"
    assert report.target_value(0.49996, 0.5) == "49.99%"  # not "50.0%"
    assert report.target_value(None, 1.5) == "—"


def test_the_decode_clock_times_from_the_first_new_token_to_the_end(monkeypatch):
    """Decode speed is read off one generation, not the difference of two (which a slow prefill drove negative)."""
    from tessera.bench import timing

    now = iter([10.0, 10.5, 99.0])  # the first new token at 10.0, the end at 10.5; nothing else reads the clock
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(now))
    clock = timing.DecodeClock()
    clock.put([[1, 2, 3]])  # the prompt: not timed
    for token in ([7], [8], [9]):
        clock.put(token)
    clock.end()
    assert clock.seconds == 0.5
    with pytest.raises(RuntimeError, match="before its first new token"):
        timing.DecodeClock().end()


def test_self_timed_contenders_report_the_median_of_what_they_return():
    from tessera.bench.timing import interleaved

    returned = {"a": iter([9.0, 3.0, 1.0, 2.0]), "b": iter([9.0, 5.0, 7.0, 6.0])}  # the first is the warm-up
    medians = interleaved({name: (lambda n=name: next(returned[n])) for name in returned}, repeats=3,
                          self_timed=True)
    assert medians == {"a": 2.0, "b": 6.0}
