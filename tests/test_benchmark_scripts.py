"""The scripts in benchmarks/ run end to end on tiny settings and print every figure they promise. They measure
speed and accuracy; nothing here asserts a time (the machine is shared), only that each script still works with
the library it measures."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_DATASET = {"train": 48, "test": 12, "seed": 0}
TINY_PLANS = {  # the quickstart's stages, a few steps each
    "unified": {"steps": {"text": 2, "encoder_pretrain": 2, "align": 2, "instruct": 4}, "schedule": {"text": "wsd"}},
    "cross": {"steps": {"text": 2, "pretrain": 2, "finetune": 4}, "schedule": "wsd", "gate_lr_scale": 100.0},
}


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_inference_precision(capsys):
    # --quick's own 32 tokens: with a handful, decode speed (full generation − prefill) can come out negative on a
    # busy machine, which is noise, not a failure of the script
    assert _script("inference_precision").main(["--quick"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split(",")[0] for line in lines[2:]}
    assert rows == {"prefill", "decode"} and len(lines) == 5  # header, columns, prefill, decode at batch 1 and 2
    for line in lines[2:]:
        float32, bfloat16, ratio = line.split()[-3:]
        assert math.isfinite(float(float32)) and math.isfinite(float(bfloat16)) and ratio.endswith("×")


def test_inference_precision_refuses_too_few_tokens():
    with pytest.raises(SystemExit):
        _script("inference_precision").main(["--quick", "--new-tokens", "1"])


@pytest.mark.parametrize("fusion", ["unified", "cross"])
def test_training_precision(fusion, tmp_path, monkeypatch, capsys):
    script = _script("training_precision")
    monkeypatch.setattr(script, "DATASET", TINY_DATASET)
    assert script.main(["--fusion", fusion, "--out", str(tmp_path), "--steps", "1", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stages = [line.split()[0] for line in lines[2:]]
    assert stages == list(TINY_PLANS[fusion]["steps"])  # one row per stage of the recipe
    for line in lines[2:]:
        assert line.endswith("×") and float(line.split()[-2]) > 0


def test_quickstart_curve(tmp_path, monkeypatch, capsys):
    script = _script("quickstart_curve")
    monkeypatch.setattr(script, "DATASET", TINY_DATASET)
    monkeypatch.setattr(script, "QUICKSTART_RUNS", TINY_PLANS)
    out = tmp_path / "curve.json"
    assert script.main(["--fusion", "cross", "--out", str(tmp_path / "run"), "--last-stage-steps", "4",
                        "--every", "2", "--json", str(out)]) == 0
    curve = json.loads(out.read_text())["curve"]
    # checkpoints every 2 global steps; only those of the multimodal stages are evaluated, in order
    assert [point["step"] for point in curve] == [4, 6, 8] and curve[-1]["stage"] == "finetune"
    assert all(0 <= point["exact_match"] <= 1 and point["by_type"] for point in curve)
    assert all(a["train_seconds"] <= b["train_seconds"] for a, b in zip(curve, curve[1:]))  # rounded to 0.1 s
    assert capsys.readouterr().out.count("EM ") == len(curve)


def test_serve_load(tmp_path, capsys):
    from tests.test_serve import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "ck")
    out = tmp_path / "load.json"
    assert _script("serve_load").main([
        "--checkpoint", str(checkpoint), "--clients", "3", "--requests-per-client", "2", "--max-batch", "2", "1",
        "--max-tokens", "2", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [row["max_batch"] for row in rows] == [2, 1]
    for row in rows:  # every request answered with its expected status (main() returns 1 otherwise)
        assert row["requests"] == 6 and row["server_errors"] == row["lost"] == row["wrong"] == 0
        assert row["requests_per_s"] > 0
    assert "throughput --max-batch 2 vs 1" in capsys.readouterr().out


def test_continuous_batching(capsys):
    script = _script("continuous_batching")
    assert script.main(["--requests", "4", "--every", "1", "--min-tokens", "2", "--max-tokens", "5", "--hidden", "32",
                        "--layers", "1", "--max-batch", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "same answers in every round of both modes: yes"
    figures = {line[:28].strip(): line[28:].split() for line in lines[2:-1]}
    assert list(figures) == ["mean time to first token ms", "p90 time to first token ms", "mean latency ms",
                             "throughput tokens/s", "decode steps", "largest batch", "rows joined a running batch"]
    assert all(len(cells) == 2 and all(float(c) >= 0 for c in cells) for cells in figures.values())
    assert figures["rows joined a running batch"][0] == "0"  # static batching admits only between batches


@pytest.mark.parametrize("fusion", ["unified", "cross", "hybrid"])
def test_join_cost(fusion, capsys):
    assert _script("join_cost").main(["--quick", "--rows", "2", "--tokens", "60", "--repeats", "1",
                                      "--fusion", fusion]) == 0
    lines = capsys.readouterr().out.splitlines()
    figures = {line[:36].strip(): line[36:].split() for line in lines[2:]}
    assert list(figures) == [f"{what}, {how}" for what in ("join", "decode step after the join", "leave")
                             for how in ("in place", "copied")]
    assert all(len(cells) == 1 and float(cells[0]) >= 0 for cells in figures.values())


def test_prefill_chunks(capsys):
    from tessera.bench.suite import QUICK, tessera_config
    from tessera.flops import image_cost_in_tokens

    assert _script("prefill_chunks").main(["--quick", "--rows", "2", "--prompt-tokens", "40", "--images", "2",
                                           "--uncounted", "--chunks", "0", "16", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:16].strip(): [float(cell) for cell in line[16:].split()] for line in lines[2:]}
    assert list(rows) == ["whole", "16", "16, uncounted"] and all(len(cells) == 3 for cells in rows.values())
    # the running rows get one token per advance of the newcomer's prefill of 1 + 2 × 16 + 40 tokens: in one go,
    # one; images uncounted, one per chunk of 16; counted, each image (worth more than 16 tokens) in one of its own
    assert image_cost_in_tokens(tessera_config(QUICK, "unified")) > 16
    assert rows["whole"][2] == 1 and rows["16, uncounted"][2] == -(-73 // 16) and rows["16"][2] == 2 + -(-73 // 16)