"""Resumable runs: a run stopped (Ctrl-C, or killed after a checkpoint) and resumed computes exactly what the
uninterrupted run computes; a resume that could not continue the same run is refused, naming why."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from tessera import CheckpointError, ConfigError
from tessera.errors import TrainingError
from tessera.data.shapes import make_shapes_dataset
from tessera.train.run import RunConfig, run_training
from tests.test_train import TINY_MODEL


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(directory, train=40, test=6, seed=0, text_train=40, text_test=10)
    return directory


def _config(shapes, out, **fields):
    return {"recipe": "llava", "data": str(shapes), "out": str(out), "model": TINY_MODEL, "vocab_size": 400,
            "batch_size": 4, "steps": {"text": 2, "encoder_pretrain": 4, "align": 2, "instruct": 3}, **fields}


def _train(config, **kwargs):
    return run_training(RunConfig.from_dict(config), log=lambda *_: None, progress=False, **kwargs)


def _records(out):
    return [(r["run"], r["stage"], r["step"], r["loss"], r["lr"], r["grad_norm"])
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _resume_and_stop_applying_the_first_step(config, checkpoint, monkeypatch):
    """--resume-from `checkpoint`, stopped (Ctrl-C) while its first step is applied: it saves weights only, and
    writes no record."""
    apply = torch.optim.AdamW.step

    def applying(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.optim.AdamW, "step", applying)
    with pytest.raises(KeyboardInterrupt):
        _train(config, resume=checkpoint)
    monkeypatch.setattr(torch.optim.AdamW, "step", apply)


def _stop_at(monkeypatch, run_step):
    """Ctrl-C in the middle of run step `run_step` (its gradient computed, nothing applied)."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == run_step:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", interrupted)
    return lambda: monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


@pytest.mark.parametrize("recipe, steps, fields, stop", [
    # encoder_pretrain keeps only the encoder: stopped in it at run steps 4 and 5, the decoder it trains so far and
    # the weights it puts back at its end both come through; the run then goes on through align and instruct
    ("llava", {"text": 2, "encoder_pretrain": 4, "align": 2, "instruct": 3}, {}, 4),
    # stopped in the first of two stages (step 2), and at the start of the second (step 4), with accumulation and
    # length grouping (their data order) and a warmup spanning the stop
    ("molmo", {"text": 3, "train": 5}, {"grad_accum": 2, "group_by_length": True, "warmup": 0.5}, 2),
])
def test_a_resumed_run_computes_exactly_what_the_uninterrupted_run_computes(shapes, tmp_path, monkeypatch, recipe,
                                                                            steps, fields, stop):
    config = _config(shapes, tmp_path / "straight", recipe=recipe, steps=steps, checkpoint_every=stop, **fields)
    straight = _train(config)
    expected = _records(tmp_path / "straight")
    assert len(expected) == sum(steps.values())
    weights = {k: v.clone() for k, v in straight["model"].state_dict().items()}

    def same_run(result, out):
        assert _records(out) == expected  # every step once, the same run number, the same losses to the bit
        assert all(torch.equal(v, result["model"].state_dict()[k]) for k, v in weights.items())
        assert (result["text_loss_before"], result["text_loss_after"]) == \
            (straight["text_loss_before"], straight["text_loss_after"])

    # Ctrl-C two steps after a checkpoint: OUT/interrupted is the newest resumable checkpoint, and --resume finds it
    interrupted = {**config, "out": str(tmp_path / "interrupted")}
    undo, lines = _stop_at(monkeypatch, stop + 2), []
    with pytest.raises(KeyboardInterrupt):
        run_training(RunConfig.from_dict(interrupted), log=lines.append, progress=False)
    undo()
    if recipe == "llava":  # stopped in encoder_pretrain, which had not finished: nothing was "kept"
        assert "stage 'encoder_pretrain' stopped: projector, llm put back as they were before it" in lines
        assert not any("kept the trained" in line for line in lines)
    assert len(_records(tmp_path / "interrupted")) == stop + 1
    resumed = _train(interrupted, resume=True)
    assert (resumed["resumed_at"], resumed["steps"]) == (stop + 1, len(expected))
    same_run(resumed, tmp_path / "interrupted")
    assert not (tmp_path / "interrupted/interrupted").exists()  # the finished run supersedes it

    # killed after step `stop + 1`, past the checkpoint of step `stop`: the records of the steps taken again go
    lines = (tmp_path / "straight/metrics.jsonl").read_text().splitlines()
    (tmp_path / "straight/metrics.jsonl").write_text("\n".join(lines[:stop + 1]) + "\n" + lines[stop + 1][:20])
    resumed = _train(config, resume=tmp_path / f"straight/checkpoints/step-{stop:06d}")
    same_run(resumed, tmp_path / "straight")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP"])
def test_a_run_stopped_by_sigterm_or_sighup_saves_like_ctrl_c_and_resumes_exactly(shapes, tmp_path, signame):
    """`kill`, `timeout`, a scheduler's preemption and a closed terminal send SIGTERM or SIGHUP, which end a
    process at once by default: the steps since the last checkpoint (all of them, with checkpoint_every 0) were
    lost. `tessera train` takes them as Ctrl-C: OUT/interrupted is saved, the exit status is the signal's, and
    --resume computes what the uninterrupted run does."""
    import os
    import signal
    import subprocess
    import sys

    import yaml

    config = _config(shapes, tmp_path / "straight")
    straight = _train(config)
    stopped = {**config, "out": str(tmp_path / "stopped")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(stopped))
    # the signal arrives during run step 5 (its gradient computed, nothing applied), from outside the training code
    script = f"""
import os, signal, sys, torch
from tessera.cli import main
clip, calls = torch.nn.utils.clip_grad_norm_, []
def clip_and_signal(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5:
        os.kill(os.getpid(), signal.{signame})
    return clip(*args, **kwargs)
torch.nn.utils.clip_grad_norm_ = clip_and_signal
sys.exit(main(["train", {str(tmp_path / "run.yaml")!r}, "--no-progress"]))
"""
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": root})
    signum = getattr(signal, signame)
    assert done.returncode == 128 + signum, done.stderr[-2000:]
    assert f"interrupted ({signame})" in done.stderr and (tmp_path / "stopped/interrupted").is_dir()
    assert len(_records(tmp_path / "stopped")) == 4
    resumed = _train(stopped, resume=True)
    assert resumed["resumed_at"] == 4 and _records(tmp_path / "stopped") == _records(tmp_path / "straight")
    assert all(torch.equal(v, resumed["model"].state_dict()[k]) for k, v in straight["model"].state_dict().items())


def test_a_save_cut_short_leaves_the_earlier_save_in_its_place_whole_and_resumable(shapes, tmp_path, monkeypatch):
    """A save into a directory that holds an earlier one (OUT/interrupted of a resumed run stopped again; step
    checkpoints saved again after --resume-from an earlier step) removed the earlier state first: cut short, it left
    new weights and no state, and that save was no longer resumable. It is written beside and swapped in whole."""
    import tessera.train.loop as loop
    from tessera.train.state import latest_resumable, load_state, read_position

    out = tmp_path / "out"
    result = _train(_config(shapes, out, steps={"text": 2, "encoder_pretrain": 0, "align": 0, "instruct": 2},
                            checkpoint_every=1))
    directory = latest_resumable(out)
    weights, position = (directory / "model.safetensors").read_bytes(), read_position(directory)
    with torch.no_grad():
        next(result["model"].parameters()).add_(1.0)  # weights unlike the saved ones

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_state", disk_full)
    with pytest.raises(OSError, match="No space left"):
        loop.save_checkpoint(result["model"], result["processor"], directory, load_state(directory), out)
    assert (directory / "model.safetensors").read_bytes() == weights and read_position(directory) == position
    assert latest_resumable(out) == directory and not list(directory.parent.glob(".*"))
    monkeypatch.undo()
    loop.save_checkpoint(result["model"], result["processor"], directory, load_state(directory), out)
    assert (directory / "model.safetensors").read_bytes() != weights and read_position(directory)["saved"] > \
        position["saved"]
    assert latest_resumable(out) == directory and not list(directory.parent.glob(".*"))


def test_a_checkpoint_directory_that_is_a_symlink_is_saved_into_where_it_points(tmp_path):
    """OUT/checkpoint linked to another disk: the link itself was swapped out for a directory on OUT's disk, and
    removing the old one (a link) failed the save; every later save failed as well."""
    from tessera.checkpoint import written_whole_directory

    elsewhere, link = tmp_path / "other-disk/checkpoint", tmp_path / "out/checkpoint"
    elsewhere.mkdir(parents=True)
    link.parent.mkdir()
    link.symlink_to(elsewhere, target_is_directory=True)
    for text in ("first", "second"):
        with written_whole_directory(link) as saving:
            (saving / "config.json").write_text(text)
        assert link.is_symlink() and (link / "config.json").read_text() == text == (elsewhere / "config.json").read_text()
    assert sorted(p.name for p in elsewhere.parent.iterdir()) == ["checkpoint"]


def test_stop_signals_are_given_back_their_handlers_after_training(shapes, tmp_path):
    import signal

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    _train(_config(shapes, tmp_path / "out", steps={"text": 1, "encoder_pretrain": 0, "align": 0, "instruct": 1}))
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


def test_a_stop_while_a_step_is_applied_saves_weights_only_and_resume_takes_the_checkpoint_before(
        shapes, tmp_path, monkeypatch):
    config = _config(shapes, tmp_path / "run", checkpoint_every=2)
    undo = _stop_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(config)
    undo()
    assert (tmp_path / "run/interrupted/training_state.json").is_file()  # resumable, after run step 1
    apply, calls = torch.optim.AdamW.step, []

    def applying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the resumed run's third step: run step 4
            raise KeyboardInterrupt
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", applying)
    lines = []
    with pytest.raises(KeyboardInterrupt):
        run_training(RunConfig.from_dict(config), log=lines.append, progress=False, resume=True)
    monkeypatch.setattr(torch.optim.AdamW, "step", apply)
    assert lines[-1].endswith(f"saved the model as it was to {tmp_path / 'run/interrupted'} (weights only: it stopped "
                              f"while a step was being applied; --resume continues from the latest checkpoint instead)")
    assert not (tmp_path / "run/interrupted/training_state.json").exists()  # the first stop's state went with it
    lines = []
    resumed = run_training(RunConfig.from_dict(config), log=lines.append, progress=False, resume=True)
    assert resumed["resumed_at"] == 2  # the text stage's end, as far as step-000002 and further into the run
    assert (f"resuming run 1 from {tmp_path / 'run/checkpoints/stage-0-text'} at run step 2 (stage "
            f"'encoder_pretrain' after 0 of its steps); removed the 1 records of later steps") in "\n".join(lines)
    assert [r[2] for r in _records(tmp_path / "run")] == list(range(1, 12))


def test_resume_does_not_silently_continue_an_older_run_and_draws_the_run_it_trained(shapes, tmp_path, monkeypatch):
    """Run 1 stops with resumable checkpoints; run 2, a new run into the same OUT, stops while applying a step, so
    it leaves none. --resume must not take run 1's checkpoint for "the newest" without a word; --resume-from it does
    continue run 1, and loss.png then draws run 1, not the abandoned run 2."""
    config = _config(shapes, tmp_path / "run")
    undo = _stop_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        _train(config)  # run 1: steps 1-3 recorded, stage-0-text and interrupted resumable
    undo()
    apply, calls = torch.optim.AdamW.step, []

    def applying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return apply(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", applying)
    with pytest.raises(KeyboardInterrupt):
        _train(config)  # run 2: step 1 recorded, stopped applying step 2 (weights only)
    monkeypatch.setattr(torch.optim.AdamW, "step", apply)
    # run 2's stop went to its own slot, weights only; run 1's, resumable, is the newest resumable checkpoint
    assert not (tmp_path / "run/run-2-interrupted/training_state.json").exists()
    assert (tmp_path / "run/run-2-interrupted/model.safetensors").is_file()
    newest = tmp_path / "run/interrupted"
    with pytest.raises(CheckpointError, match=re.escape(
            f"run 2 left no resumable checkpoint (its metrics are in metrics.jsonl); the newest one, {newest}, is "
            f"of run 1. Expected --resume-from {newest} to continue run 1 anyway, or a new run")):
        _train(config, resume=True)
    from matplotlib.axes import Axes

    drawn, plot = [], Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, **kwargs: drawn.extend(x) or plot(self, x, y, **kwargs))
    _train(config, resume=newest)
    assert sorted(drawn) == list(range(1, 12))  # run 1's steps, resumed after its step 3; not run 2's step 1


def test_resume_after_going_back_to_an_older_run_continues_that_run(shapes, tmp_path):
    """Run 2 saved checkpoints; then run 1 was continued with --resume-from, so run 1's are the latest written.
    --resume refused, saying run 2 left no resumable checkpoint, which was not so."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=2)
    _train(config)  # run 1: step checkpoints every 2 steps
    _train({**config, "checkpoint_every": 3})  # run 2, a new run: its step-3 and step-9 survive what follows
    run_1 = tmp_path / "run/checkpoints/step-000004"
    assert json.loads((run_1 / "training_state.json").read_text())["run"] == 1
    _train(config, resume=run_1)
    result = _train(config, resume=True)  # run 1's end: nothing left to train
    assert result["resumed_at"] == 11 and result["steps"] == 11
    assert {json.loads(p.read_text())["run"]
            for p in (tmp_path / "run/checkpoints").glob("*step-*/training_state.json")} == {1, 2}


def test_resume_after_going_back_refuses_the_abandoned_branch_when_the_new_one_saved_nothing(
        shapes, tmp_path, monkeypatch):
    """Taken back to step 4 with --resume-from and stopped while applying its first step (weights only), the run
    has no newer resumable checkpoint than the abandoned branch's. --resume took that branch's end, run step 11,
    while metrics.jsonl, cut back to step 4 by the --resume-from, went on from there: steps 5-11 missing from it,
    and weights of the branch the user had left."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=2)
    _train(config)
    went_back = tmp_path / "run/checkpoints/step-000004"
    _resume_and_stop_applying_the_first_step(config, went_back, monkeypatch)
    assert not (tmp_path / "run/interrupted/training_state.json").exists()
    abandoned = tmp_path / "run/checkpoints/stage-3-instruct"
    with pytest.raises(CheckpointError, match=re.escape(
            f"the newest resumable checkpoint, {abandoned}, is at run step 11 of run 1, but metrics.jsonl records "
            f"that run only up to step 4")):
        _train(config, resume=True)
    assert _train(config, resume=went_back)["resumed_at"] == 4
    assert [r[2] for r in _records(tmp_path / "run")] == list(range(1, 12))


def test_resume_refuses_another_run_than_the_latest_session_that_saved_nothing(shapes, tmp_path, monkeypatch):
    """Runs 1 and 2 saved checkpoints; then run 1 was continued with --resume-from and stopped while applying its
    first step: no record, no resumable checkpoint. The newest checkpoint is run 2's, but the training last done
    into OUT was run 1's, and --resume took run 2's without a word."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=2)
    _train(config)  # run 1
    _train({**config, "checkpoint_every": 3})  # run 2: its checkpoints are written after run 1's
    went_back = tmp_path / "run/checkpoints/step-000004"
    _resume_and_stop_applying_the_first_step(config, went_back, monkeypatch)
    newest = tmp_path / "run/checkpoints/run-2-stage-3-instruct"
    assert json.loads((newest / "training_state.json").read_text())["run"] == 2
    with pytest.raises(CheckpointError, match=re.escape(
            f"the latest training session into it continued run 1 from run step 4 and saved no resumable "
            f"checkpoint; the newest one, {newest}, is of run 2. Expected --resume-from {went_back} to try that "
            f"again, or --resume-from {newest} to continue run 2 anyway")):
        _train(config, resume=True)
    assert _train(config, resume=went_back)["resumed_at"] == 4
    assert _train(config, resume=True)["resumed_at"] == 11  # run 1's end now: its session saved


def test_an_unreadable_session_record_is_named(shapes, tmp_path):
    config = _config(shapes, tmp_path / "run", steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    _train(config)
    (tmp_path / "run/session.json").write_text('{"run": 1, "st')  # as a disk that filled up might leave it
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'run/session.json'}: unreadable")):
        _train(config, resume=True)


def test_a_run_resumed_after_its_last_stage_has_nothing_left_to_train(shapes, tmp_path):
    config = _config(shapes, tmp_path / "run", steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    first = _train(config)
    again = _train(config, resume=True)  # the newest: the last stage's checkpoint
    assert (again["resumed_at"], again["steps"]) == (4, 4)
    assert [r[2] for r in _records(tmp_path / "run")] == [1, 2, 3, 4]
    assert again["text_loss_after"] == first["text_loss_after"]


def test_resuming_a_different_run_is_refused_naming_what_differs(shapes, tmp_path):
    config = _config(shapes, tmp_path / "run", steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    _train(config)
    changed = {**config, "batch_size": 8, "seed": 3, "steps": {**config["steps"], "instruct": 5}}
    with pytest.raises(ConfigError) as error:
        _train(changed, resume=True)
    assert re.search(r"the run config differs from the checkpoint's run in batch_size \(4 in the checkpoint, 8 now\), "
                     r"seed \(0 in the checkpoint, 3 now\), steps.instruct \(1 in the checkpoint, 5 now\); expected "
                     r"the same run to continue it", str(error.value))
    # what may change: where it writes, how often it saves, its threads; the data may move, not change
    data = tmp_path / "moved"
    shutil.copytree(shapes, data)
    _train({**config, "data": str(data), "checkpoint_every": 7, "threads": 1, "compile": True}, resume=True)
    (data / "train.json").write_text(json.dumps(json.loads((data / "train.json").read_text())[:-1]))
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's run in files\.train\.json \(sha256 \w{12}… "
                                          r"in the checkpoint, sha256 \w{12}… now\)"):
        _train({**config, "data": str(data)}, resume=True)


def test_resume_refused_by_the_newest_checkpoint_of_another_run_config_names_one_of_this_config(shapes, tmp_path):
    """Run 2, another config, wrote into run 1's OUT: --resume with run 1's config took run 2's newest checkpoint and
    refused it, with no word of run 1's own checkpoint."""
    config = _config(shapes, tmp_path / "run", steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    _train(config)
    _train({**config, "seed": 5})  # run 2
    own = tmp_path / "run/checkpoints/stage-3-instruct"
    with pytest.raises(ConfigError, match=re.escape(
            "seed (5 in the checkpoint, 0 now); expected the same run to continue it (only ")) as error:
        _train(config, resume=True)
    assert str(error.value).endswith(f"; {own} (run 1, step 4) is of this run config: --resume-from {own} continues "
                                     f"it")
    with pytest.raises(ConfigError) as error:  # no checkpoint of this config: no advice
        _train({**config, "seed": 6}, resume=True)
    assert str(error.value).endswith("or a new run without --resume")
    assert _train(config, resume=own)["resumed_at"] == 4


def test_a_checkpoint_without_a_readable_training_state_is_refused_naming_the_file(shapes, tmp_path):
    config = _config(shapes, tmp_path / "run", steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'run'}: no such directory, so no resumable "
                                                        f"checkpoint in it")):
        _train(config, resume=True)
    assert not (tmp_path / "run").exists()  # a mistyped OUT is not made
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'run'}: no resumable checkpoint")):
        _train(config, resume=True)
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'elsewhere'}: no such checkpoint directory")):
        _train(config, resume=tmp_path / "elsewhere")
    _train(config)
    final = tmp_path / "run/checkpoint"
    with pytest.raises(CheckpointError, match=re.escape(f"{final}: a weights-only checkpoint (no "
                                                        f"training_state.json), so the run cannot continue from it")):
        _train(config, resume=final)
    stage = tmp_path / "run/checkpoints/stage-1-encoder_pretrain"
    (stage / "training_state.pt").write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match=re.escape(f"{stage / 'training_state.pt'}: not a readable training "
                                                        f"state")):
        _train(config, resume=stage)
    (stage / "training_state.json").write_text("{")
    with pytest.raises(CheckpointError, match=re.escape(f"{stage / 'training_state.json'}: not valid JSON")):
        _train(config, resume=stage)


def test_resume_from_a_broken_newest_checkpoint_names_the_newest_other_to_continue_from(shapes, tmp_path):
    """A disk that filled up or a copy cut short can break the checkpoint --resume picks; the error says which
    other one the run can go on from."""
    config = _config(shapes, tmp_path / "run", steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    _train(config)
    newest, before = (tmp_path / f"run/checkpoints/{name}" for name in ("stage-3-instruct", "stage-2-align"))
    advice = (f"; the newest other resumable checkpoint under {tmp_path / 'run'} is {before} (run 1, step 3): "
              f"--resume-from {before} continues from there")
    (newest / "model.safetensors").write_bytes(b"cut short")
    with pytest.raises(CheckpointError, match=re.escape(f"{newest / 'model.safetensors'}: not a readable ") + ".*" +
                       re.escape(advice) + "$"):
        _train(config, resume=True)
    (newest / "training_state.json").write_text("{")  # now --resume cannot even tell where it stands
    with pytest.raises(CheckpointError, match=re.escape(f"{newest / 'training_state.json'}: not valid JSON") + ".*" +
                       re.escape(advice) + "$"):
        _train(config, resume=True)
    with pytest.raises(CheckpointError) as named:  # --resume-from names its checkpoint: no other is offered
        _train(config, resume=newest)
    assert "resumable checkpoint under" not in str(named.value)
    assert _train(config, resume=before)["resumed_at"] == 3


def test_a_run_drawing_from_torch_s_rng_resumes_with_the_numbers_it_would_have_drawn(shapes, tmp_path, monkeypatch):
    """Nothing in the model draws random numbers today; a dropout layer would, from torch's global generator."""
    from tessera.model import MultimodalLM

    forward = MultimodalLM.forward

    def noisy(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        if self.training:
            output.loss = output.loss * (1 + 0.5 * torch.rand(()))
        return output

    monkeypatch.setattr(MultimodalLM, "forward", noisy)
    config = _config(shapes, tmp_path / "straight", recipe="molmo", steps={"text": 2, "train": 4})
    straight = _train(config)
    interrupted = {**config, "out": str(tmp_path / "interrupted")}
    undo = _stop_at(monkeypatch, 4)  # after step 4's forward drew its number
    with pytest.raises(KeyboardInterrupt):
        _train(interrupted)
    undo()
    resumed = _train(interrupted, resume=True)
    assert _records(tmp_path / "interrupted") == _records(tmp_path / "straight")
    assert all(torch.equal(v, resumed["model"].state_dict()[k]) for k, v in straight["model"].state_dict().items())


def _step_checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("*step-*"))


def test_keep_checkpoints_keeps_the_newest_step_checkpoints_of_the_run(shapes, tmp_path):
    """Steps 2, 4, …, 10 each write a checkpoint (11 steps in all); with keep_checkpoints 2 the last two stay, and
    the end-of-stage ones too. A second run into the same directory leaves the first run's alone, and the run can
    be resumed with another keep_checkpoints."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=2, keep_checkpoints=2)
    _train(config)
    assert _step_checkpoints(tmp_path / "run") == ["step-000008", "step-000010"]
    assert len(list((tmp_path / "run/checkpoints").glob("stage-*"))) == 4
    # run 2 into the same directory, saving every 3 steps
    _train({**config, "checkpoint_every": 3, "keep_checkpoints": 1})
    assert _step_checkpoints(tmp_path / "run") == ["run-2-step-000009", "step-000008", "step-000010"]
    assert json.loads((tmp_path / "run/checkpoints/run-2-step-000009/training_state.json").read_text())["run"] == 2
    _train({**config, "keep_checkpoints": 0}, resume=tmp_path / "run/checkpoints/run-2-step-000009")  # may change


def test_after_resuming_from_an_earlier_step_the_steps_taken_again_are_kept(shapes, tmp_path, monkeypatch):
    """keep_checkpoints keeps the most recently written, not the highest steps: continued from step 4 and stopped in
    step 7, the run's new step 6 is kept over the step 8 of the branch it left."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=2, steps={"text": 2, "encoder_pretrain": 4,
                                                                       "align": 2, "instruct": 0})
    _train(config)
    assert _step_checkpoints(tmp_path / "run") == ["step-000002", "step-000004", "step-000006", "step-000008"]
    rewritten = tmp_path / "run/checkpoints/step-000006/training_state.json"
    before = rewritten.stat().st_mtime_ns
    _stop_at(monkeypatch, 3)  # the third step it takes: run step 7
    with pytest.raises(KeyboardInterrupt):
        _train({**config, "keep_checkpoints": 1}, resume=tmp_path / "run/checkpoints/step-000004")
    assert _step_checkpoints(tmp_path / "run") == ["step-000006"] and rewritten.stat().st_mtime_ns > before


def test_resume_continues_where_the_run_stopped_last_not_at_the_abandoned_branch_s_furthest_step(
        shapes, tmp_path, monkeypatch):
    """Continued from step 4 and stopped in step 7, the run's newest state is OUT/interrupted at step 6. --resume
    took the furthest checkpoint instead, the end-of-stage one at step 8 of the branch the user left, and trained
    on from there."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=2, steps={"text": 2, "encoder_pretrain": 4,
                                                                       "align": 2, "instruct": 0})
    _train(config)
    restore = _stop_at(monkeypatch, 3)  # the third step it takes: run step 7
    with pytest.raises(KeyboardInterrupt):
        _train(config, resume=tmp_path / "run/checkpoints/step-000004")
    restore()
    assert json.loads((tmp_path / "run/interrupted/training_state.json").read_text())["step"] == 6
    assert _train(config, resume=True)["resumed_at"] == 6
    # the finished run's last save is its final stage's; one written before save numbers existed ranks below
    # every numbered one
    from tessera.train.state import latest_resumable
    assert latest_resumable(tmp_path / "run") == tmp_path / "run/checkpoints/stage-3-instruct"
    legacy = tmp_path / "run/checkpoints/stage-3-instruct/training_state.json"
    position = json.loads(legacy.read_text())
    del position["saved"]
    legacy.write_text(json.dumps(position))
    assert latest_resumable(tmp_path / "run") == tmp_path / "run/checkpoints/stage-2-align"


def test_an_optimizer_state_of_other_parameter_groups_is_named(shapes, tmp_path):
    """A checkpoint saved before biases, norms and gates were spared weight decay holds one optimizer group per
    component, not two: its resume is an error that says so, not torch's bare "different number of groups"."""
    config = _config(shapes, tmp_path / "run", checkpoint_every=5, weight_decay=0.1)
    _train(config)
    checkpoint = tmp_path / "run/checkpoints/step-000005"  # inside encoder_pretrain
    tensors = torch.load(checkpoint / "training_state.pt", weights_only=True)
    groups = tensors["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["vision", "vision.no_decay", "projector", "projector.no_decay", "llm",
                                           "llm.no_decay"]
    tensors["optimizer"]["param_groups"] = groups[::2]  # one per component, as the older tessera saved it
    torch.save(tensors, checkpoint / "training_state.pt")
    with pytest.raises(TrainingError, match=r"stage 'encoder_pretrain': the checkpoint's optimizer state has 3 "
                                            r"parameter groups where this stage has 6; with weight_decay > 0"):
        _train(config, resume=checkpoint)


def test_keep_checkpoints_never_removes_the_checkpoint_it_has_just_written(shapes, tmp_path, monkeypatch):
    """Which checkpoints are newest was read off their files' mtimes (now their save numbers). When the clock is
    stepped back after the first checkpoint (NTP correcting a VM's clock, or a run directory copied from a machine
    whose clock is ahead), every later checkpoint looks older than that one: keep_checkpoints 1 removed each new
    checkpoint right after writing it and kept run step 2, so a crash lost every step since."""
    import os

    import tessera.train.loop

    save_state, stepped = tessera.train.loop.save_state, []

    def save_then_step_the_clock_back(directory, state, out):
        save_state(directory, state, out)
        written = directory / "training_state.json"
        if not directory.name.startswith(".step-"):  # written beside its place (.step-N.saving), then swapped in
            return
        if stepped:  # from the second checkpoint on, the clock reads an hour earlier than when the first was written
            os.utime(written, ns=(written.stat().st_atime_ns, written.stat().st_mtime_ns - 3600 * 10**9))
        stepped.append(directory.name.removeprefix(".").removesuffix(".saving"))

    monkeypatch.setattr(tessera.train.loop, "save_state", save_then_step_the_clock_back)
    _train(_config(shapes, tmp_path / "run", checkpoint_every=2, keep_checkpoints=1,
                   steps={"text": 2, "encoder_pretrain": 4, "align": 0, "instruct": 0}))
    assert stepped[:3] == ["step-000002", "step-000004", "step-000006"]
    assert _step_checkpoints(tmp_path / "run") == ["step-000006"]


def test_a_step_checkpoint_that_cannot_be_removed_is_a_warning_not_a_stop(shapes, tmp_path, monkeypatch):
    """keep_checkpoints is housekeeping: a checkpoint that will not go (permissions, a busy network file) is named
    in a warning and the run goes on to its end."""
    import tessera.train.state

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(tessera.train.state.shutil, "rmtree", refuse)
    lines = []
    config = RunConfig.from_dict(_config(shapes, tmp_path / "run", checkpoint_every=2, keep_checkpoints=1))
    run_training(config, log=lines.append, progress=False)
    assert (tmp_path / "run/checkpoint/model.safetensors").is_file()  # it trained to its end
    assert _step_checkpoints(tmp_path / "run") == [f"step-{s:06d}" for s in (2, 4, 6, 8, 10)]
    warnings = [line for line in lines if line.startswith("warning: could not remove")]
    # each later checkpoint tries the older ones again: 1 + 2 + 3 + 4
    assert len(warnings) == 10 and "step-000002 (keep_checkpoints: 1): [Errno 13] Permission denied" in warnings[0]


def _checkpoint_files(out):
    """Each directory under OUT/checkpoints → its files' bytes."""
    return {d.name: {f.name: f.read_bytes() for f in d.iterdir()} for d in sorted((out / "checkpoints").iterdir())}


def test_a_second_run_into_the_same_out_keeps_the_first_run_s_checkpoints_and_each_resumes_under_its_own_names(
        shapes, tmp_path):
    """Checkpoints were named by step or stage only: run 2 into the same OUT overwrote run 1's of the same names
    (and one killed while saving left neither). Run N > 1's are named run-N-…, and a resumed run keeps its own."""
    from tessera.train.state import latest_resumable

    out = tmp_path / "run"
    run_1 = _config(shapes, out, checkpoint_every=2, steps={"text": 2, "encoder_pretrain": 2, "align": 1,
                                                            "instruct": 1})
    run_2 = {**run_1, "seed": 1}  # other weights than run 1's
    names = ["stage-0-text", "stage-1-encoder_pretrain", "stage-2-align", "stage-3-instruct", "step-000002",
             "step-000004", "step-000006"]
    _train(run_1)
    first = _checkpoint_files(out)
    assert sorted(first) == names
    _train(run_2)
    both = _checkpoint_files(out)
    assert {name: both[name] for name in names} == first  # byte for byte
    assert sorted(both) == sorted(names + [f"run-2-{name}" for name in names])
    assert {json.loads(both[f"run-2-{name}"]["training_state.json"])["run"] for name in names} == {2}
    assert latest_resumable(out) == out / "checkpoints/run-2-stage-3-instruct"
    assert _train(run_2, resume=True)["resumed_at"] == 6
    # each run goes on under its own names, and leaves the other's alone
    _train(run_2, resume=out / "checkpoints/run-2-step-000002")
    again = _checkpoint_files(out)
    assert {name: again[name] for name in names} == first and sorted(again) == sorted(both)
    assert _train(run_1, resume=out / "checkpoints/step-000002")["resumed_at"] == 2
    last = _checkpoint_files(out)
    assert sorted(last) == sorted(both)
    assert {name: files for name, files in last.items() if name.startswith("run-2-")} == \
           {name: files for name, files in again.items() if name.startswith("run-2-")}
    for name in names:  # run 1's again, as it computed them the first time, saved anew
        assert last[name]["model.safetensors"] == first[name]["model.safetensors"]
        assert json.loads(last[name]["training_state.json"])["run"] == 1
    assert latest_resumable(out) == out / "checkpoints/stage-3-instruct"


def test_keep_checkpoints_removes_only_the_step_checkpoints_of_its_own_run(shapes, tmp_path):
    """Run 2 with keep_checkpoints 1 overwrote run 1's step checkpoints of the same steps, then removed them as its
    own: run 1 was left with none."""
    out = tmp_path / "run"
    config = _config(shapes, out, checkpoint_every=2, steps={"text": 2, "encoder_pretrain": 4, "align": 0,
                                                             "instruct": 0})
    _train(config)
    first = _checkpoint_files(out)
    _train({**config, "keep_checkpoints": 1})
    second = _checkpoint_files(out)
    assert {name: second[name] for name in first} == first
    assert _step_checkpoints(out) == ["run-2-step-000006", "step-000002", "step-000004", "step-000006"]
    # run 1 continued with keep_checkpoints 1: its own step checkpoints go, run 2's stays
    _train({**config, "keep_checkpoints": 1}, resume=out / "checkpoints/step-000002")
    assert _step_checkpoints(out) == ["run-2-step-000006", "step-000006"]
    assert _checkpoint_files(out)["run-2-step-000006"] == second["run-2-step-000006"]


def test_a_second_training_session_into_an_out_in_use_is_refused_and_writes_nothing(shapes, tmp_path):
    """Two sessions into one OUT at once interleaved metrics.jsonl, shared save numbers and pruned each other's
    checkpoints. The second is refused at once, naming OUT and the holder's PID; the lock dies with its holder."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")  # Windows: no lock to test
    out = tmp_path / "run"
    config = _config(shapes, out, steps={"text": 1, "encoder_pretrain": 1, "align": 1, "instruct": 1})
    _train(config)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(out / '.train.lock')!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "f.truncate(0); f.write(f'{os.getpid()}\\n'); f.flush()\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        for resume in (None, True):
            with pytest.raises(ConfigError, match=re.escape(
                    f"{out}: another training session (PID {holder.pid}) is writing into it; expected that session "
                    f"to finish first, or another out")):
                _train(config, resume=resume)
        assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    finally:
        holder.kill()  # as a killed session would be: the kernel lets go of its lock
        holder.wait()
    assert _train(config, resume=True)["resumed_at"] == 4
    assert _train(config)["steps"] == 4  # run 2


def test_a_new_run_stopped_in_the_same_out_keeps_the_earlier_run_s_stop(shapes, tmp_path, monkeypatch):
    """OUT/interrupted was one slot for every run: a new run started without --resume and stopped replaced the
    earlier run's stop — its only copy of the steps since its last checkpoint — and one that finished removed it.
    Run N > 1 stops into OUT/run-N-interrupted; a run finishing removes only its own."""
    out = tmp_path / "run"
    config = _config(shapes, out)
    undo = _stop_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _train(config)  # run 1 stops in run step 5: OUT/interrupted holds steps 3-4, past stage-0-text
    undo()
    run_1_stop = {f.name: f.read_bytes() for f in (out / "interrupted").iterdir()}
    undo = _stop_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _train(config)  # run 2, by mistake: stopped in its run step 2
    undo()
    assert {f.name: f.read_bytes() for f in (out / "interrupted").iterdir()} == run_1_stop
    assert json.loads((out / "run-2-interrupted/training_state.json").read_text())["run"] == 2
    assert _train(config, resume=True)["resumed_at"] == 1  # the newest: run 2's stop
    assert not (out / "run-2-interrupted").exists() and (out / "interrupted").is_dir()
    assert _train(config, resume=out / "interrupted")["resumed_at"] == 4  # run 1 goes on from its own stop
    assert not (out / "interrupted").exists()


def test_a_run_s_stop_saved_in_the_old_shared_slot_is_removed_when_that_run_finishes(shapes, tmp_path, monkeypatch):
    """Before run N > 1 had OUT/run-N-interrupted, every run stopped into OUT/interrupted. Such an OUT holding run 2's
    stop there: run 2 resumes from it and, finished, removes it as its own (run 1's own stop would stay)."""
    out = tmp_path / "run"
    config = _config(shapes, out)
    _train(config)  # run 1 finishes
    undo = _stop_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _train(config)  # run 2 stops in its run step 3
    undo()
    (out / "run-2-interrupted").rename(out / "interrupted")  # where that stop lay before
    result = _train(config, resume=True)
    assert result["resumed_at"] == 2 and not (out / "interrupted").exists()


def test_a_new_run_into_an_out_with_a_stopped_run_warns_that_resume_continues_it(shapes, tmp_path, monkeypatch):
    """Starting a run again without --resume is allowed (a new run, numbered after the stopped one, which stays
    resumable), but more likely a slip: the log says what is there and how to continue it instead."""
    config = _config(shapes, tmp_path / "out")
    restore = _stop_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        _train(config)
    restore()
    logged = []
    run_training(RunConfig.from_dict({**config, "steps": {"text": 1, "encoder_pretrain": 0, "align": 0,
                                                         "instruct": 0}}), log=logged.append, progress=False)
    warning = [line for line in logged if line.startswith("warning: ")]
    assert warning == [f"warning: {tmp_path / 'out'} holds interrupted, left by a stopped run; this starts a new run "
                       f"from the first step. To continue the stopped one instead: stop this and run it again with "
                       f"--resume"]
    assert (tmp_path / "out/interrupted").is_dir()
    # a stop saved as weights only (mid-update) is not what --resume continues from: nothing to point at
    (tmp_path / "out/interrupted/training_state.json").unlink()
    logged.clear()
    run_training(RunConfig.from_dict({**config, "steps": {"text": 1, "encoder_pretrain": 0, "align": 0,
                                                         "instruct": 0}}), log=logged.append, progress=False)
    assert not [line for line in logged if line.startswith("warning: ")]


def test_a_session_refused_by_the_lock_leaves_the_out_it_found_made_for_the_holder(shapes, tmp_path, monkeypatch):
    """A session that made OUT and was then refused by another's lock (the other having taken it in between)
    removed OUT as its own empty leftover — the holder's directory, its lock file inside."""
    import contextlib

    import tessera.train.run

    @contextlib.contextmanager
    def taken_meanwhile(out, log):
        (out / ".train.lock").write_text("4242\n")
        raise ConfigError(f"{out}: another training session (PID 4242) is writing into it")
        yield  # noqa: unreachable (a generator all the same)

    monkeypatch.setattr(tessera.train.run, "training_lock", taken_meanwhile)
    with pytest.raises(ConfigError, match="another training session"):
        _train(_config(shapes, tmp_path / "new"))
    assert (tmp_path / "new/.train.lock").read_text() == "4242\n"
