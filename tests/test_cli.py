"""Every `tessera` verb on a tiny run, through the installed console script, and the one-line errors."""

import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tessera.train.loop import training_precision
from tests.test_train import TINY_MODEL

TESSERA = shutil.which("tessera", path=os.path.dirname(sys.executable)) or "tessera"


def tessera(*args, cwd=None, check=True):
    result = subprocess.run([TESSERA, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"tessera {' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """data → train → a checkpoint, through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    out = tessera("data", "shapes", "--out", root / "data", "--train", 30, "--test", 4, "--seed", 1,
                  "--text-train", 20, "--text-test", 5)
    assert "wrote" in out.stdout
    config = {"recipe": "llava", "data": str(root / "data"), "out": str(root / "run"), "model": TINY_MODEL,
              "vocab_size": 400, "batch_size": 4,
              "steps": {"text": 3, "encoder_pretrain": 2, "align": 2, "instruct": 2}}
    (root / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    result = tessera("train", root / "run.yaml", "steps.instruct=3", "--no-progress")
    assert "trained 10 steps" in result.stdout
    assert "trainable" in result.stdout and "frozen" in result.stdout  # the per-stage parameter table
    assert "records kept" in result.stdout
    return root


def test_train_writes_checkpoints_metrics_and_curve(trained):
    run = trained / "run"
    assert {p.name for p in (run / "checkpoint").iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                               "processor_config.json"}
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 10
    assert (run / "loss.png").is_file()


def test_eval_writes_metrics_and_prints_a_table(trained):
    out = trained / "metrics.json"
    result = tessera("eval", "--checkpoint", trained / "run/checkpoint", "--data", trained / "data/test.json",
                     "--out", out)
    metrics = json.loads(out.read_text())
    assert 0 <= metrics["exact_match"] <= 1 and metrics["questions"] > 0 and metrics["captions"] == 4
    assert set(metrics["exact_match_by_type"]) <= {"colour", "shape", "count", "exists", "position"}
    assert "cider" in metrics and "bleu4" in metrics and metrics["text_loss"] > 0
    assert "exact match" in result.stdout and "CIDEr" in result.stdout
    assert "4 captions: too few for CIDEr-D" in result.stdout  # the table says so; the JSON keeps the figure
    assert len(out.with_suffix(".predictions.jsonl").read_text().splitlines()) == metrics["questions"] + 4


def test_eval_flags_and_unusable_held_out_text_are_one_line_errors(trained, tmp_path):
    checkpoint, data = trained / "run/checkpoint", trained / "data/test.json"
    out = tmp_path / "short.json"
    tessera("eval", "--checkpoint", checkpoint, "--data", data, "--limit", 3, "--max-new-tokens", 2, "--out", out)
    assert len(out.with_suffix(".predictions.jsonl").read_text().splitlines()) == 3
    (tmp_path / "empty.jsonl").write_text("")
    for args, words in [
        (["--limit", 0], "--limit 0: expected an integer >= 1"),
        (["--max-new-tokens", 0], "--max-new-tokens 0: expected an integer >= 1"),
        (["--batch-size", 0], "--batch-size 0: expected an integer >= 1"),
        (["--text-data", tmp_path / "empty.jsonl"], f"{tmp_path / 'empty.jsonl'}: no usable held-out text records"),
        (["--data", trained / "data"], f"--data {trained / 'data'}: a directory; expected a LLaVA .json list or a "
                                       f"messages .jsonl file"),
        (["--text-data", tmp_path / "nope.jsonl"], f"--text-data {tmp_path / 'nope.jsonl'}: no such file"),
    ]:
        result = tessera("eval", "--checkpoint", checkpoint, "--data", data, "--limit", 3, *args, check=False)
        assert result.returncode == 2 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_generate_answers_and_reports_bad_inputs_in_one_line(trained, tmp_path):
    checkpoint = trained / "run/checkpoint"
    image = trained / "data/images/test_00000.png"
    result = tessera("generate", "--checkpoint", checkpoint, "--image", image, "--prompt", "What colour is it?",
                     "--max-new-tokens", 5)
    assert result.returncode == 0 and result.stderr == ""
    # sampling from the single likeliest token is greedy decoding, whatever the temperature
    sampled = tessera("generate", "--checkpoint", checkpoint, "--image", image, "--prompt", "What colour is it?",
                      "--max-new-tokens", 5, "--temperature", 1.5, "--top-k", 1, "--seed", 3)
    assert sampled.stdout == result.stdout
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG broken")
    for args, words in [
        (["--image", tmp_path / "missing.png"], "image file not found"),
        (["--image", tmp_path / "corrupt.png"], "not a readable image"),
        (["--top-k", -1], "--top-k -1: expected an integer >= 0"),  # the flag, not the setting behind it
        (["--temperature", -0.5], "--temperature -0.5: expected a finite number >= 0"),
        (["--top-p", 0], "--top-p 0.0: expected a number in (0, 1]"),
        (["--max-new-tokens", 0], "--max-new-tokens 0: expected an integer >= 1"),
    ]:
        result = tessera("generate", "--checkpoint", checkpoint, "--prompt", "hi", *args, check=False)
        assert result.returncode == 2 and words in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    result = tessera("generate", "--checkpoint", tmp_path, "--prompt", "hi", check=False)  # not a checkpoint
    assert result.returncode == 2 and "config.json" in result.stderr and "Traceback" not in result.stderr
    result = tessera("generate", "--checkpoint", tmp_path / "nowhere", "--prompt", "hi", check=False)
    assert result.returncode == 2 and "no such checkpoint directory" in result.stderr
    result = tessera("generate", "--checkpoint", tmp_path / "nowhere", "--prompt", "hi", "--top-p", 2, check=False)
    assert "--top-p 2.0" in result.stderr  # checked before the model is looked for, let alone loaded


def test_train_strict_stops_on_a_bad_record_and_default_skips_it(trained, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    records = json.loads((data / "train.json").read_text())
    records[3]["image"] = "images/none.png"
    (data / "train.json").write_text(json.dumps(records))
    config = {"recipe": "molmo", "data": str(data), "out": str(tmp_path / "run"), "model": TINY_MODEL,
              "vocab_size": 400, "batch_size": 4, "steps": {"text": 1, "train": 1}}
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    skipped = tessera("train", tmp_path / "run.yaml", "--no-progress")
    assert "1 skipped" in skipped.stdout and "missing image" in skipped.stdout
    strict = tessera("train", tmp_path / "run.yaml", "--strict", "--no-progress", check=False)
    assert strict.returncode == 2 and f"record {records[3]['id']}: missing image" in strict.stderr


def test_bad_run_configs_are_one_line_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("recipe: llava\ndata: nowhere\n")
    result = tessera("train", tmp_path / "run.yaml", check=False)
    assert result.returncode == 2 and "data=nowhere: no such directory; expected the dataset's directory" in \
        result.stderr and "tessera data shapes" not in result.stderr
    (tmp_path / "empty").mkdir()
    result = tessera("train", tmp_path / "run.yaml", "data=" + str(tmp_path / "empty"), check=False)
    assert result.returncode == 2 and "train.json: no such file (nor train.jsonl)" in result.stderr
    result = tessera("train", tmp_path / "run.yaml", "steps.align=many", check=False)
    assert result.returncode == 2 and "steps.align='many'" in result.stderr


def test_train_reports_a_bad_config_value_in_one_line_naming_the_key(tmp_path, capsys):
    from tessera.cli import main

    (tmp_path / "run.yaml").write_text("recipe: llava\ndata: nowhere\n")
    for override, words in [
        ("threads=two", "threads='two': expected a positive integer"),
        ("checkpoint_every=often", "checkpoint_every='often'"),
        ("lr_scale.align=2", "lr_scale.align=2: expected a mapping"),
        ("steps.align=[", "override 'steps.align=['"),
        ("fusion=cross", "fusion='cross' with recipe 'llava'"),
    ]:
        assert main(["train", str(tmp_path / "run.yaml"), override]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_train_takes_overrides_after_its_flags_and_resumes_a_run(trained, tmp_path, capsys):
    from tessera.cli import main

    config = {"recipe": "molmo", "data": str(trained / "data"), "out": str(tmp_path / "run"), "model": TINY_MODEL,
              "vocab_size": 400, "batch_size": 4, "steps": {"text": 1, "train": 1}}
    (tmp_path / "run.yaml").write_text(json.dumps(config))
    train = ["train", str(tmp_path / "run.yaml")]
    assert main([*train, "--no-progress", "steps.train=2", "--strict", "checkpoint_every=2"]) == 0
    assert "trained 3 steps in" in capsys.readouterr().out
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "run/checkpoints/step-000002").is_dir()
    assert main([*train, "--no-progress", "seed"]) == 2
    assert "override 'seed': expected key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error, as for any verb's unknown flag
        main([*train, "--no-progress", "--bogus", "seed=1"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err

    step_2 = str(tmp_path / "run/checkpoints/step-000002")
    # the later of two overrides of a key wins, wherever they are
    assert main([*train, "steps.train=1", "--resume-from", step_2, "--no-progress", "steps.train=2"]) == 0
    assert "trained 1 step (resumed at run step 2) in" in capsys.readouterr().out
    assert main([*train, "--no-progress", "--resume"]) == 2  # the newest is the last stage's checkpoint, of 2 steps
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run/checkpoints/stage-1-train'}: the run config differs from the checkpoint's run in " \
           f"steps.train (2 in the checkpoint, 1 now)" in err and len(err.strip().splitlines()) == 1, err


def test_train_on_wrong_typed_record_fields_skips_them_or_names_them(tmp_path, capsys):
    from tessera.cli import main

    records = [{"id": "x", "conversations": 5},
               {"id": "y", "image": 5, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                        {"from": "gpt", "value": "red"}]}]
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "run.yaml").write_text(json.dumps({"recipe": "molmo", "data": str(tmp_path), "out": str(tmp_path / "o"),
                                                   "model": TINY_MODEL, "vocab_size": 400, "steps": {"text": 0}}))
    assert main(["train", str(tmp_path / "run.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith("has none: 0 records kept (0 captions, 0 questions), 2 skipped (1 malformed turns, "
                                "1 malformed images)") and len(err.strip().splitlines()) == 1
    assert main(["train", str(tmp_path / "run.yaml"), "--strict", "--no-progress"]) == 2
    assert "train.json: record x: malformed turns: 'conversations' must be a list, got 5" in capsys.readouterr().err


def test_recipes_lists_every_recipe():
    out = tessera("recipes").stdout
    for name in ("llava", "llama3.2", "molmo", "qwen2-vl", "baichuan-omni", "nvlm-d", "nvlm-x", "nvlm-h"):
        assert name in out


def test_quickstart_runs_end_to_end_on_a_tiny_budget(tmp_path, monkeypatch):
    """The real quickstart code path with every stage shortened to a few steps (the full run is measured by
    `tessera quickstart` itself, not in the suite)."""
    from tessera import quickstart as qs

    monkeypatch.setattr(qs, "DATASET", {"train": 24, "test": 4, "seed": 0})
    for fusion, steps in (("unified", {"text": 2, "encoder_pretrain": 2, "align": 1, "instruct": 2}),
                          ("cross", {"text": 2, "pretrain": 2, "finetune": 2}),
                          ("hybrid", {"text": 2, "encoder_pretrain": 2, "align": 1, "finetune": 2})):
        monkeypatch.setitem(qs.QUICKSTART_RUNS, fusion, {**qs.QUICKSTART_RUNS[fusion], "steps": steps,
                                                         "model": TINY_MODEL, "vocab_size": 400, "batch_size": 4})
        lines = []
        metrics = qs.quickstart(tmp_path / fusion, fusion, log=lines.append, progress=False)
        saved = json.loads((tmp_path / fusion / "metrics.json").read_text())
        assert saved == metrics
        for key in ("exact_match", "cider", "text_loss_before", "text_loss_after", "wall_seconds", "fusion", "recipe"):
            assert key in saved, key
        assert saved["fusion"] == fusion and saved["recipe"] == qs.DEFAULT_RECIPE[fusion]
        assert saved["precision"] == training_precision("auto")
        assert (tmp_path / fusion / "checkpoint/model.safetensors").is_file()
        printed = "\n".join(lines)
        assert "exact match" in printed and printed.count("(reference") == 3
    assert json.loads((tmp_path / "cross/metrics.json").read_text())["text_loss_before"] == \
        json.loads((tmp_path / "cross/metrics.json").read_text())["text_loss_after"]
    # the hybrid's scenes are drawn at twice the encoder's size: a 2x2 grid of tiles beside the thumbnail
    from PIL import Image

    scene = next((tmp_path / "hybrid/data/images").iterdir())
    assert Image.open(scene).size == (96, 96) and Image.open(next((tmp_path / "unified/data/images").iterdir())).size \
        == (48, 48)


def test_a_stopped_quickstart_says_how_to_resume_and_resumes(tmp_path, monkeypatch):
    """A quickstart has no run config for `tessera train CONFIG --resume`: it names its own command, and
    `tessera quickstart --resume` continues the training where it stopped."""
    from tessera import MultimodalLM
    from tessera import quickstart as qs
    from tessera.cli import main

    monkeypatch.setattr(qs, "DATASET", {"train": 24, "test": 4, "seed": 0})
    monkeypatch.setitem(qs.QUICKSTART_RUNS, "unified", {
        **qs.QUICKSTART_RUNS["unified"], "steps": {"text": 2, "encoder_pretrain": 2, "align": 2, "instruct": 2},
        "model": TINY_MODEL, "vocab_size": 400, "batch_size": 4, "checkpoint_every": 1})
    real_forward, calls = MultimodalLM.forward, []

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 6:  # Ctrl-C in the align stage's second step, before its update
                raise KeyboardInterrupt
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(MultimodalLM, "forward", forward)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        qs.quickstart(tmp_path / "qs", "unified", log=lines.append, progress=False, precision="fp32")
    command = f"tessera quickstart --out {tmp_path / 'qs'} --fusion unified --precision fp32 --resume"
    assert any(line.endswith(f"continue the run with: {command}") for line in lines), lines
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    main(command.split()[1:] + ["--no-progress"])
    records = [json.loads(line) for line in (tmp_path / "qs/run/metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "step" in r and r.get("run") == 1]
    assert steps == list(range(1, 9)), steps  # each step once: the resumed run went on from its checkpoint
    assert (tmp_path / "qs/metrics.json").is_file()
    # an --out with no quickstart in it: said before the dataset was drawn, naming the --out given (not OUT/run)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert main(["quickstart", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert (f"--out {tmp_path / 'new'}: no quickstart to resume in it (no {tmp_path / 'new' / 'run'})"
            in sys.stderr.getvalue())
    assert not (tmp_path / "new").exists()


def test_quickstart_precision_flag(tmp_path, monkeypatch):
    """--precision reaches the run; a precision the trainer doesn't know is refused by the parser."""
    from tessera import quickstart as qs

    seen = []
    monkeypatch.setattr(qs, "quickstart", lambda out, fusion, progress, precision, resume: seen.append(precision))
    from tessera.cli import main
    main(["quickstart", "--out", str(tmp_path), "--precision", "fp32"])
    assert seen == ["fp32"]
    result = tessera("quickstart", "--precision", "fp16", check=False)
    assert result.returncode == 2 and "invalid choice: 'fp16'" in result.stderr


def test_the_help_names_every_verb():
    out = tessera("--help").stdout
    for verb in ("quickstart", "data", "train", "eval", "generate"):
        assert verb in out


def test_the_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """README's "Use it" snippet, run as a user would paste it, in an empty directory."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Use it"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md (Use it)", "exec"), {})
    assert (tmp_path / "ckpt" / "model.safetensors").is_file() and (tmp_path / "ckpt" / "tokenizer.json").is_file()


def test_an_output_directory_that_is_a_file_is_named_before_any_work(tmp_path, capsys):
    """mkdir failed deep inside, as a bare '[Errno 17] File exists' naming no flag."""
    from tessera.cli import main

    taken = tmp_path / "run.yaml"
    taken.write_text("recipe: llava\ndata: data\n")
    for args, label in [
        (["quickstart", "--out", str(taken)], f"--out {taken}: a file"),
        (["data", "shapes", "--out", str(taken / "data")], f"--out {taken / 'data'}: its parent {taken} is a file"),
        (["export", str(tmp_path), str(taken), "--format", "hf"], f"out_dir {taken}: a file"),
        (["train", str(taken), f"out={taken}"], f"out={taken}: a file"),
    ]:
        assert main(args) == 2, args
        error = capsys.readouterr().err.strip()
        assert label in error and "expected a directory (made if missing)" in error and "\n" not in error, error


def test_data_shapes_does_not_replace_a_directory_s_dataset_unless_told(tmp_path, capsys):
    """It rewrote one's own train.json in silence (and a train.json beside one's train.jsonl changed which file
    trains)."""
    from tessera.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.jsonl").write_text('{"id": "mine"}\n')
    assert main(["data", "shapes", "--out", str(mine), "--train", "2", "--test", "1"]) == 2
    assert capsys.readouterr().err.strip() == (f"tessera data: error: --out {mine}: holds train.jsonl already; "
                                               f"expected a new or empty directory (or --overwrite, to replace them "
                                               f"with the shapes dataset)")
    assert sorted(p.name for p in mine.iterdir()) == ["train.jsonl"]
    assert main(["data", "shapes", "--out", str(mine), "--train", "2", "--test", "1", "--overwrite"]) == 0
    assert not (mine / "train.jsonl").exists()  # replaced: beside train.json it would make training refuse `mine`
    assert main(["data", "shapes", "--out", str(mine), "--train", "2", "--test", "1"]) == 2  # its own files too
    assert ("holds train.json, test.json, text_train.jsonl, text_test.jsonl, images/train_*.png and test_*.png (3 "
            "files) already") in capsys.readouterr().err
    pictures = tmp_path / "pictures"  # images alone: writing there deletes its train_*.png
    (pictures / "images").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(pictures / "images" / "train_00007.png")
    assert main(["data", "shapes", "--out", str(pictures), "--train", "2", "--test", "1"]) == 2
    assert (pictures / "images" / "train_00007.png").is_file()


def test_train_without_a_config_asks_for_the_config_only(capsys):
    from tessera.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["train"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().endswith("the following arguments are required: config")  # not overrides
