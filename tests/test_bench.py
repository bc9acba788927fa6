"""`tessera bench --quick` runs and reports every figure (no timing is asserted: the machine is shared)."""

import json
import math

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
    speeds = results["matmul_gflops_by_kernel"]  # the peak is the fastest kernel tessera can use
    assert "torch.mm" in speeds and all(map(_finite, speeds.values()))
    assert results["matmul_gflops"] == max(speeds.values())
    assert ("oneDNN" in speeds) == (results["linear_backend"] == "onednn")
    llava = results["llava"]
    for name in ("tessera", "transformers"):
        assert _finite(llava["train"][name]["samples_per_s"]) and _finite(llava["train"][name]["mfu"])
        assert _finite(llava["prefill"][name]["seconds"])
        for batch in map(str, suite.QUICK.decode_batches):
            assert _finite(llava["decode"][batch][name]["tokens_per_s"])
    assert set(results["fusion_scaling"]) == set(map(str, suite.QUICK.scaling_image_tokens))
    for row in results["fusion_scaling"].values():
        for fusion in ("unified", "cross"):
            assert _finite(row[fusion]["seconds"]) and _finite(row[fusion]["flops"])
        assert _finite(row["b_speedup"])
    assert _finite(results["mllama_reference"]["seconds"]) and results["mllama_reference"]["cross_attention_layers"]
    for line in ("training step", "MFU", "prefill", "greedy decode, batch 1", "Method A (unified)", "Mllama",
                 "Targets"):
        assert line in printed, line
    assert len(report.targets(results)) == 6


def test_method_b_needs_fewer_flops_than_method_a_as_the_image_grows():
    """The article's efficiency claim, in the analytic count the benchmark's MFU uses."""
    from tessera.bench.flops import training_step_flops
    from tessera.config import ModelConfig

    def config(fusion):
        return ModelConfig.from_dict({"vision": {"image_size": 512, "pre_layernorm": True},
                                      "fusion": {"method": fusion, "vision_feature_layer": -2}})

    a, b = config("unified"), config("cross")
    ratios = [training_step_flops(a, 1, n, 65, 64) / training_step_flops(b, 1, n, 66, 64) for n in (64, 1024, 4096)]
    assert 1 < ratios[0] < ratios[1] < ratios[2]
