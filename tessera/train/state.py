"""A resumable checkpoint's training state: where a run stopped, and what its continuation needs to be exact.

A resumable checkpoint is an ordinary checkpoint directory (config.json, model.safetensors, tokenizer.json, …) with

    training_state.json   the position — run number, run step, stage and step within it — the held-out text loss
                          measured before the multimodal stages, the run-config values the continuation depends on,
                          and the save number: one more than any resumable checkpoint's under OUT when it was
                          written, so "the checkpoint written last" does not depend on the clock
    training_state.pt     tensors: AdamW's and the LR schedule's state, the weights a `keep` stage puts back at its
                          end, torch's RNG state; loaded with weights_only=True, so nothing in it runs as code

The JSON is written last: a directory whose save was cut short has none, and is not offered for resuming.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.checkpoint import write_whole
from tessera.errors import CheckpointError, ConfigError

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.pt"
FORMAT = 1
# run-config fields that may change between a run and its continuation: where it writes, how often it saves and how
# many of those saves it keeps, how many threads compute it and whether compiled (either may move the last bits of
# the sums), how it treats bad records (the records it keeps are compared through the data files)
MAY_CHANGE = ("out", "data", "checkpoint_every", "keep_checkpoints", "threads", "strict", "compile")


@dataclass
class StageState:
    """How far a stage got, and what train_stage needs to continue it exactly."""
    step: int = 0  # the stage's steps done
    optimizer: dict | None = None  # AdamW's state_dict after those steps
    schedule: dict | None = None  # the LR schedule's
    restore: dict[str, dict[str, torch.Tensor]] | None = None  # component → weights put back at the end (`keep`)
    # component → weights trained so far, of a stage stopped mid-way whose components were already put back
    in_progress: dict[str, dict[str, torch.Tensor]] | None = None
    rng: torch.Tensor | None = None  # torch's RNG state after those steps: what a dropout layer would draw from
    # set while a step is being applied: a run stopped then has weights that are neither before nor after it
    mid_update: bool = False


@dataclass
class TrainingState:
    run: int  # the metrics.jsonl run number
    step: int  # run steps done
    stage: int  # index of the stage in progress, or of the next one at a stage boundary
    stage_name: str | None  # None: every stage is done
    text_loss_before: float | None
    fingerprint: dict[str, Any]  # see run_fingerprint
    stage_state: StageState = field(default_factory=StageState)


def save_state(directory: Path, state: TrainingState, out: Path) -> None:
    """Write `state` into the checkpoint `directory` of the run writing into `out`."""
    saved = 1 + max((save_number(position) for position, _ in resumable_checkpoints(out)), default=0)
    stage = state.stage_state
    torch.save({"optimizer": stage.optimizer, "schedule": stage.schedule, "restore": stage.restore,
                "in_progress": stage.in_progress, "rng": stage.rng}, directory / STATE_TENSORS)
    position = {"format": FORMAT, "run": state.run, "step": state.step, "stage": state.stage,
                "stage_name": state.stage_name, "stage_step": stage.step, "text_loss_before": state.text_loss_before,
                "fingerprint": state.fingerprint, "saved": saved}
    write_whole(directory / STATE_JSON, json.dumps(position, indent=1) + "\n")


def read_position(directory: Path) -> dict:
    """training_state.json of a resumable checkpoint, checked enough to order checkpoints by it."""
    path = directory / STATE_JSON
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint directory; expected a resumable checkpoint "
                              f"(OUT/interrupted or OUT/checkpoints/step-* or stage-*; OUT/run-N-interrupted, "
                              f"run-N-step-* or run-N-stage-* of run N > 1)")
    if not path.is_file():
        raise CheckpointError(f"{directory}: a weights-only checkpoint (no {STATE_JSON}), so the run cannot continue "
                              f"from it; expected OUT/interrupted or OUT/checkpoints/step-* or stage-* (OUT/run-N-"
                              f"interrupted, run-N-step-* or run-N-stage-* of run N > 1) of a run that saves its "
                              f"training state")
    try:
        position = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); expected the training state tessera train writes") \
            from None
    keys = {"run": int, "step": int, "stage": int, "stage_step": int, "fingerprint": dict}
    wrong = [k for k, kind in keys.items() if not isinstance(position, dict) or not isinstance(position.get(k), kind)]
    if wrong or position.get("format") != FORMAT:
        what = f"field {wrong[0]!r} missing or of the wrong type" if wrong else f"format {position.get('format')!r}"
        raise CheckpointError(f"{path}: {what}; expected the training state (format {FORMAT}) tessera train writes")
    return position


def load_state(directory: Path) -> TrainingState:
    position = read_position(directory)
    path = directory / STATE_TENSORS
    try:
        tensors = torch.load(path, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file; {directory / STATE_JSON} expects it beside it") from None
    except Exception as e:  # torch.load raises whatever unpickling or unzipping a damaged file raises
        raise CheckpointError(f"{path}: not a readable training state ({type(e).__name__}: {e})") from None
    if not isinstance(tensors, dict) or not isinstance(tensors.get("rng"), torch.Tensor):
        raise CheckpointError(f"{path}: expected the training state tessera train writes (with the RNG state)")
    stage = StageState(step=position["stage_step"], optimizer=tensors.get("optimizer"),
                       schedule=tensors.get("schedule"), restore=tensors.get("restore"),
                       in_progress=tensors.get("in_progress"), rng=tensors["rng"])
    return TrainingState(run=position["run"], step=position["step"], stage=position["stage"],
                         stage_name=position.get("stage_name"), text_loss_before=position.get("text_loss_before"),
                         fingerprint=position["fingerprint"], stage_state=stage)


def checkpoint_name(run: int, name: str) -> str:
    """Run N > 1's checkpoints carry "run-N-": a later run into the same OUT must not overwrite an earlier run's."""
    return name if run == 1 else f"run-{run}-{name}"


def own_stops(out: Path, run: int) -> list[Path]:
    """Where run `run` stopped and saved, if it did: its own slot (`interrupted_directory`), and OUT/interrupted when
    that holds run `run` > 1's stop — every run stopped there before run N > 1 had a slot of its own."""
    stops = [interrupted_directory(out, run)]
    shared = out / "interrupted"
    if run > 1 and (shared / STATE_JSON).is_file():
        try:
            if read_position(shared)["run"] == run:
                stops.append(shared)
        except (CheckpointError, OSError):
            pass  # unreadable: not known to be this run's, so it stays
    return [stop for stop in stops if stop.is_dir()]


def interrupted_directory(out: Path, run: int) -> Path:
    """Where run `run` saves the model when it stops mid-stage: OUT/interrupted, OUT/run-N-interrupted for run
    N > 1. One per run, so a new run started by mistake (no --resume) and stopped cannot replace an earlier run's."""
    return out / checkpoint_name(run, "interrupted")


def prune_step_checkpoints(out: Path, run: int, keep: int, written: Path) -> list[tuple[Path, OSError | None]]:
    """Delete all but the `keep` most recently written step checkpoints (OUT/checkpoints/step-*, run-N-step-* of
    run N > 1: see checkpoint_name) of run `run`; returns each with the error deleting it raised, or None (a file
    that will not go must not stop a run). Each holds the optimizer's moments too, about 3× the model, so a long
    run's would fill the disk.
    Most recently written (by save number, then mtime for checkpoints saved before save numbers), not highest step:
    after `--resume-from` an earlier step, the steps the run then takes again are the ones to keep. `written`, the
    checkpoint just saved, counts as the newest whatever else says. End-of-stage checkpoints, other runs' and
    weights-only ones are left alone."""
    found = []
    for position, directory in resumable_checkpoints(out):  # unreadable ones are not ours to delete
        # step-* too for run N > 1: its step checkpoints from before they were named run-N-step-*
        if directory.name.startswith(("step-", checkpoint_name(run, "step-"))) and position["run"] == run:
            try:
                mtime = (directory / STATE_JSON).stat().st_mtime_ns
            except OSError:
                continue
            found.append((directory.name == written.name, save_number(position), mtime, directory.name, directory))
    outcomes = []
    for *_, directory in sorted(found)[:max(len(found) - keep, 0)]:
        try:
            shutil.rmtree(directory)
            outcomes.append((directory, None))
        except OSError as e:
            outcomes.append((directory, e))
    return outcomes


def save_number(position: dict) -> int:
    """The order checkpoints were saved in under one OUT (0 for those from before save numbers were written)."""
    saved = position.get("saved", 0)
    return saved if isinstance(saved, int) and not isinstance(saved, bool) else 0


def resumable_checkpoints(out: Path, strict: bool = False) -> list[tuple[dict, Path]]:
    """(position, directory) of every resumable checkpoint under OUT: OUT/interrupted, OUT/run-N-interrupted and
    OUT/checkpoints/*. One whose training state cannot be read is an error with `strict`, and left out without."""
    found = []
    for directory in [out / "interrupted", *sorted(out.glob("run-*-interrupted")),
                      *sorted((out / "checkpoints").glob("[!.]*"))]:  # not a save under way (.NAME.saving)
        if (directory / STATE_JSON).is_file():
            try:
                found.append((read_position(directory), directory))
            except (CheckpointError, OSError):
                if strict:
                    raise
    return found


def latest_resumable(out: Path) -> Path:
    """The resumable checkpoint under OUT written last. Not the furthest step: after `--resume-from` an earlier
    step, the abandoned branch's later checkpoints are not where the run stopped. Checkpoints from before save
    numbers were written come first, the furthest into the latest run last."""
    found = [(_save_order(position), directory) for position, directory in resumable_checkpoints(out, strict=True)]
    if not found:
        raise CheckpointError(f"{out}: no resumable checkpoint (OUT/interrupted, OUT/run-N-interrupted or "
                              f"OUT/checkpoints/*/{STATE_JSON}); "
                              f"expected a run into {out} that saved one (every checkpoint_every steps, at each "
                              f"stage's end, or when stopped)")
    return max(found)[1]


def _save_order(position: dict) -> tuple:
    return save_number(position), position["run"], position["step"], position["stage"]


def _newest_other(out: Path, besides: Path | None, fingerprint: dict[str, Any] | None = None
                  ) -> tuple[int, int, Path] | None:
    """(run, step, directory) of the newest resumable checkpoint under OUT other than `besides`, of the run config
    `fingerprint` if given; None if there is none."""
    found = [(_save_order(position), directory) for position, directory in resumable_checkpoints(out)
             if directory != besides and (fingerprint is None or position.get("fingerprint") == fingerprint)]
    if not found:
        return None
    (_, run, step, _), directory = max(found)
    return run, step, directory


def another_to_resume_from(out: Path, broken: Path | None) -> str:
    """Advice for when the checkpoint --resume picked (`broken`; None: one it could not even read the position of)
    cannot be read: the newest other resumable checkpoint under OUT, or "" if there is none."""
    if (other := _newest_other(out, broken)) is None:
        return ""
    run, step, directory = other
    return (f"; the newest other resumable checkpoint under {out} is {directory} (run {run}, step {step}): "
            f"--resume-from {directory} continues from there")


def one_this_run_continues(out: Path, fingerprint: dict[str, Any], refused: Path) -> str:
    """Advice for when the checkpoint --resume picked (`refused`) is of another run config: the newest resumable
    checkpoint under OUT that this run config continues, or "" if there is none."""
    if (other := _newest_other(out, refused, fingerprint)) is None:
        return ""
    run, step, directory = other
    return (f"; {directory} (run {run}, step {step}) is of this run config: --resume-from {directory} continues "
            f"it")


def file_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(run: Any, stages: list, model: Any, precision: str, files: dict[str, Path]) -> dict[str, Any]:
    """The values a continuation depends on, flattened to the dotted keys a run config spells them with: the run's
    fields (but MAY_CHANGE), the stages as built (steps.instruct, lr.instruct, …), the model as built
    (model.text.…), the precision as resolved, and the SHA-256 of the data files (files.train.json, …)."""
    fields = {k: v for k, v in dataclasses.asdict(run).items()
              if k not in MAY_CHANGE + ("model", "steps", "lr", "lr_scale", "schedule", "pretrain_encoder")}
    per_stage = {"stages": [s.name for s in stages]}
    for s in stages:
        per_stage.update({f"steps.{s.name}": s.steps, f"lr.{s.name}": s.lr, f"schedule.{s.name}": s.schedule,
                          f"lr_scale.{s.name}": s.lr_scale})
    values = {**fields, "precision": precision, **per_stage, "model": model.to_dict(),
              "files": {name: file_digest(path) for name, path in files.items()}}
    return _flat(json.loads(json.dumps(values)))  # as JSON will give it back: tuples as lists


def _flat(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_run(saved: dict, ours: dict, directory: Path) -> None:
    differing = [f"{k} ({_shown(k, saved.get(k))} in the checkpoint, {_shown(k, ours.get(k))} now)"
                 for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
    if differing:
        raise ConfigError(f"{directory}: the run config differs from the checkpoint's run in {', '.join(differing)}; "
                          f"expected the same run to continue it (only {', '.join(MAY_CHANGE)} may change), or a "
                          f"new run without --resume")


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "none" if not key.startswith("files.") else "no such file"
    if key.startswith("files."):  # a digest: its start is enough to tell
        return f"sha256 {value[:12]}…"
    return repr(value)
