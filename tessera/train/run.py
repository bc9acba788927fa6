"""A training run: YAML config (see run_config) → dataset, tokenizer, model → text pretraining → the recipe's
stages → checkpoints, metrics JSONL and a loss-curve PNG."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from tessera.checkpoint import load_weights, parameters_on_meta, write_whole
from tessera.config import ModelConfig
from tessera.data.records import JSONL_SUFFIXES, EncodedExample, SkipReport, load_examples, read_raw_records
from tessera.errors import CheckpointError, ConfigError, DataError, TrainingError
from tessera.eval.evaluate import text_lm_loss
from tessera.interop.hub_files import GENERATION_CONFIG_NAME
from tessera.model import MultimodalLM
from tessera.processor import Processor
from tessera.text.tokenizer import IMAGE, load_tokenizer, train_tokenizer
from tessera.train.distributed import Processes, join, leave
from tessera.train.loop import (RESUME_COMMAND, TrainSettings, drop_metrics_after, plot_losses, read_metrics,
                                save_checkpoint, save_interrupted, train_stage, training_precision)
from tessera.train.recipes import Stage
from tessera.train.run_config import RunConfig, build_stages, model_config, padded_vocab
from tessera.train.state import STATE_JSON, StageState, TrainingState, another_to_resume_from, \
    check_same_run, checkpoint_name, latest_resumable, load_state, one_this_run_continues, own_stops, \
    resumable_checkpoints, run_fingerprint

try:
    import fcntl
except ImportError:  # Windows: no flock, so sessions into one OUT go unguarded there
    fcntl = None


def split_file(data_dir: Path, split: str) -> Path:
    """DATA/<split>.json (LLaVA) or DATA/<split>.jsonl (messages; .ndjson too)."""
    if data_dir.is_file():
        raise DataError(f"data={data_dir}: a file; expected the dataset's directory ({data_dir.parent} here?), which "
                        f"holds {split}.json or {split}.jsonl")
    if not data_dir.is_dir():  # a mistyped path: not advice to make a dataset there
        raise DataError(f"data={data_dir}: no such directory; expected the dataset's directory, which holds "
                        f"{split}.json or {split}.jsonl")
    found = [data_dir / f"{split}{suffix}" for suffix in (".json", *JSONL_SUFFIXES)
             if (data_dir / f"{split}{suffix}").is_file()]
    if len(found) > 1:  # e.g. `tessera data shapes` run into a directory of one's own records: which one is meant?
        raise DataError(f"data={data_dir}: {' and '.join(p.name for p in found)} both; expected one {split} file "
                        f"(move the other away)")
    if found:
        return found[0]
    raise DataError(f"{data_dir / split}.json: no such file (nor {split}.jsonl); expected a data directory with "
                    f"{split}.json or {split}.jsonl (make one with: tessera data shapes --out {data_dir})")


def dataset_texts(data_dir: Path) -> list[str]:
    """Every turn of the training files: what the tokenizer is trained on."""
    texts = []
    files = [split_file(data_dir, "train")] + [p for p in [data_dir / "text_train.jsonl"] if p.is_file()]
    for path in files:
        for _, _, record in read_raw_records(path):
            turns = (record.get("conversations") or record.get("messages")) if isinstance(record, dict) else None
            if not isinstance(turns, list):  # a malformed record: load_examples skips it, naming why
                continue
            for turn in turns:
                content = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
                if isinstance(content, list):
                    content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
                if isinstance(content, str):
                    texts.append(content.replace(IMAGE, ""))
    return texts


def text_pretraining_examples(path: Path, processor: Processor, strict: bool = False
                              ) -> tuple[list[EncodedExample], SkipReport]:
    """The text stage's records (text_train.jsonl): language-model pretraining learns every token, not just the
    answers."""
    examples, report = load_examples(path, processor, strict=strict, text_only=True)
    for e in examples:
        e.labels = list(e.input_ids)
    return examples, report


def select(examples: list[EncodedExample], kind: str, text: list[EncodedExample]) -> list[EncodedExample]:
    if kind == "text":
        return text
    if kind == "captions":
        return [e for e in examples if e.example.type == "caption"]
    if kind == "questions":
        return [e for e in examples if e.example.type != "caption"]
    return examples


NOT_COMPUTED = {"family"}  # TextConfig fields that change no number the LLM computes (the name it exports under)


def check_same_llm(checkpoint: ModelConfig, ours: ModelConfig, path: str) -> None:
    """The run's LLM must be the checkpoint's: a different shape would fail deep in load_state_dict, a different
    rope_theta or norm epsilon would load and silently compute something else."""
    theirs, mine = dataclasses.asdict(checkpoint.text), dataclasses.asdict(ours.text)
    differing = [f"text.{name} ({theirs[name]!r} in the checkpoint, {mine[name]!r} in the run's model)"
                 for name in theirs if theirs[name] != mine[name] and name not in NOT_COMPUTED]
    if differing:
        raise ConfigError(f"llm_checkpoint {path}: its LLM differs from the run's model in {', '.join(differing)}; "
                          f"expected the run's model text fields to match the checkpoint's config.json")


def check_same_tokenizer(path: str, checkpoint: str, key: str = "llm_checkpoint") -> None:
    """A pretrained LLM's embeddings are indexed by its own tokenizer's ids: another tokenizer would feed it ids
    that mean other words, and nothing would fail."""
    # an imported model's tokenizer has none of tessera's special tokens: only the vocabularies are compared
    theirs = load_tokenizer(Path(checkpoint) / "tokenizer.json", required_tokens=()).get_vocab(with_added_tokens=True)
    if load_tokenizer(path, required_tokens=()).get_vocab(with_added_tokens=True) != theirs:
        raise ConfigError(f"tokenizer {path}: not the tokenizer of {key} {checkpoint} (their "
                          f"vocabularies differ), whose LLM reads its own tokenizer's ids; expected no tokenizer (the "
                          f"checkpoint's tokenizer.json is used) or that one")


RECORD_KINDS = {
    "text": "text-only conversations",
    "captions": "caption records (\"type\": \"caption\")",
    "questions": "question records (any \"type\" but \"caption\", or none)",
    "mix": "records",
}


def check_stage_data(stages: list[Stage], train_examples: list[EncodedExample], train_report: SkipReport,
                     text_examples: list[EncodedExample], text_report: SkipReport | None, processes: int = 1,
                     first: int = 0) -> None:
    """From stage `first` on (a resumed run's), a stage with steps but no usable record of its kind, or fewer than
    the run's processes, each of which takes a share of every batch, is an error before the first step."""
    for stage in stages[first:]:  # a resumed run's stages done already need no records (their files are not read)
        found = len(select(train_examples, stage.data, text_examples))
        if stage.steps and 0 < found < processes:
            source = (text_report if stage.data == "text" else train_report).source
            raise DataError(f"stage {stage.name!r} trains on {RECORD_KINDS[stage.data]}, of which {source} has "
                            f"{found}: fewer than the {processes} processes, which each take a share of every batch; "
                            f"expected at least {processes}")
        if not stage.steps or found:
            continue
        report = text_report if stage.data == "text" else train_report
        captions = sum(e.example.type == "caption" for e in train_examples)
        kept = "" if stage.data == "text" else f" ({captions} captions, {len(train_examples) - captions} questions)"
        reasons = report.reasons_line
        skipped = f"{report.skipped} skipped" + (f" ({reasons})" if reasons else "")
        raise DataError(f"stage {stage.name!r} trains on {RECORD_KINDS[stage.data]} but {report.source} has none: "
                        f"{report.kept} records kept{kept}, {skipped}")


def metrics_run(metrics_path: Path, resumed: TrainingState | None, source: Path | None, log) -> int:
    """The run number of this run's metrics records: the resumed run's, whose records of the steps it is about to
    take again go; or, after earlier runs into the same directory, the next."""
    if resumed:
        dropped = drop_metrics_after(metrics_path, resumed.run, resumed.step)
        where = (f"stage {resumed.stage_name!r} after {resumed.stage_state.step} of its steps" if resumed.stage_name
                 else "every stage done")
        log(f"resuming run {resumed.run} from {source} at run step {resumed.step} ({where})" +
            (f"; removed the {dropped} records of later steps from {metrics_path}" if dropped else ""))
        return resumed.run
    if metrics_path.is_file() and metrics_path.stat().st_size and not metrics_path.read_bytes().endswith(b"\n"):
        with metrics_path.open("a") as f:  # a killed run's half-written last line: this run's first record starts anew
            f.write("\n")
    earlier = read_metrics(metrics_path)
    if not earlier:
        return 1
    # a rerun into the same directory: keep the earlier runs' records, number this run after them
    run = max(r.get("run", 1) for r in earlier) + 1
    log(f"{metrics_path} holds {len(earlier)} steps of earlier runs; this run's steps are appended as run {run} "
        f"(loss.png shows this run only)")
    out = metrics_path.parent
    # resumable ones only: a stop saved as weights only (mid-update) is not what --resume would continue from
    stopped = [d.name for d in [out / "interrupted", *sorted(out.glob("run-*-interrupted"))]
               if (d / STATE_JSON).is_file()]
    if stopped:  # a new run is allowed (the stopped one stays resumable), but a forgotten --resume is the likelier
        log(f"warning: {out} holds {' and '.join(stopped)}, left by a stopped run; this starts a new run from the "
            f"first step. To continue the stopped one instead: stop this and run it again with --resume")
    return run


SESSION_FILE = "session.json"  # under OUT: which run the latest training session into OUT trained, from which step


def record_session(out: Path, run: int, step: int, source: Path | None) -> None:
    """Written as a session starts, before its first step: a session killed before its first record or checkpoint
    leaves nothing else behind, and --resume must still know it ran."""
    write_whole(out / SESSION_FILE, json.dumps({"run": run, "step": step,
                                                "resumed_from": str(source) if source else None}) + "\n")


def last_session(out: Path) -> dict | None:
    path = out / SESSION_FILE
    if not path.is_file():
        return None  # an OUT written before sessions were recorded
    try:
        session = json.loads(path.read_text())
        int(session["run"]), int(session["step"])
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path}: unreadable ({e}); expected the JSON a training session writes there, "
                              f"{{\"run\": N, \"step\": N, \"resumed_from\": ...}}, which --resume checks. "
                              f"--resume-from DIR continues a checkpoint without it") from None
    return session


LOCK_FILE = ".train.lock"  # under OUT: locked by the training session writing into OUT, which writes its PID in it


@contextlib.contextmanager
def training_lock(out: Path, log):
    """Held while a session writes into OUT: two at once would interleave their metrics.jsonl records, share save
    numbers and prune each other's checkpoints. A second session is refused at once."""
    if fcntl is None:
        yield
        return
    path = out / LOCK_FILE
    with path.open("a+") as f:  # not "w": that would erase the holder's PID before we know there is one
        try:
            # flock's lock belongs to the open file, which the kernel closes when its process dies, however it dies
            # (kill -9 too): a killed session leaves no stale lock
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip()
            pid = f" (PID {holder})" if holder.isdigit() else ""
            raise ConfigError(f"{out}: another training session{pid} is writing into it; expected that session to "
                              f"finish first, or another out for this one") from None
        except OSError as e:  # a file system without locks: better unguarded than no training at all
            log(f"warning: could not lock {path} ({e}); nothing stops another training session into {out} meanwhile")
            locked = False
        if locked:
            f.truncate(0)
            # under torchrun, the process to name is the launcher the user started (this worker's parent)
            f.write(f"{os.getppid() if int(os.environ.get('WORLD_SIZE', '1')) > 1 else os.getpid()}\n")
            f.flush()
        try:
            yield
        finally:
            if locked:
                f.truncate(0)  # a refused session must not name a process that has let go
                # (closing the file would unlock too, but not while a child forked meanwhile holds it open)
                fcntl.flock(f, fcntl.LOCK_UN)


def check_the_newest_is_where_the_run_left_off(out: Path, source: Path, resumed: TrainingState) -> None:
    """--resume takes the resumable checkpoint written last (`source`). metrics.jsonl and the session record say
    when that is not where the training left off: the latest session trained another run and saved nothing, a
    later run saved nothing, or the run was taken back to an earlier step and has saved nothing since."""
    # "the newest" must not silently mean an older run than a later one that saved nothing
    records = read_metrics(out / "metrics.jsonl")
    saved = {position["run"] for position, _ in resumable_checkpoints(out)}
    later = [r["run"] for r in records if r.get("run", 1) > resumed.run and r.get("run", 1) not in saved]
    if later:
        raise CheckpointError(f"{out}: run {max(later)} left no resumable checkpoint (its metrics are in "
                              f"metrics.jsonl); the newest one, {source}, is of run {resumed.run}. Expected "
                              f"--resume-from {source} to continue run {resumed.run} anyway, or a new run")
    # nor another run than the latest session's, which may have died before its first record: had that session
    # saved a resumable checkpoint, the newest would be it
    session = last_session(out)
    if session is not None and session["run"] != resumed.run:
        if session["resumed_from"]:
            began, again = (f"continued run {session['run']} from run step {session['step']}",
                            f"--resume-from {session['resumed_from']} to try that again")
        else:
            began, again = f"began run {session['run']}", "a new run"
        raise CheckpointError(f"{out}: the latest training session into it {began} and saved no resumable "
                              f"checkpoint; the newest one, {source}, is of run {resumed.run}. Expected {again}, "
                              f"or --resume-from {source} to continue run {resumed.run} anyway")
    # nor the branch a --resume-from an earlier step left: that cut the run's records back to its step, and
    # every checkpoint is saved after the records of its steps
    recorded = [r.get("step", 0) for r in records if r.get("run", 1) == resumed.run]
    if recorded and max(recorded) < resumed.step:
        raise CheckpointError(f"{out}: the newest resumable checkpoint, {source}, is at run step {resumed.step} "
                              f"of run {resumed.run}, but metrics.jsonl records that run only up to step "
                              f"{max(recorded)}: the run was taken back to an earlier step after it was saved "
                              f"(--resume-from), and has saved no resumable checkpoint since. Expected "
                              f"--resume-from the checkpoint it was taken back to, or --resume-from {source} to "
                              f"go on with the steps it left")


def run_training(run: RunConfig, log=print, progress: bool = True,
                 resume: str | Path | bool | None = None, resume_command: str = RESUME_COMMAND) -> dict[str, Any]:
    """Train every stage of the run; returns the model, processor, per-stage final losses and the held-out text
    loss before and after the multimodal stages (None without DATA/text_test.jsonl), the run steps at its end and
    the run step it resumed at (0 for a new run).

    resume: a resumable checkpoint to continue the run from, or True for the newest under OUT (see
    tessera.train.state). The stages it had done are not run again, its metrics go on as the same run, and the
    continuation computes what the uninterrupted run would have. resume_command: what a stopped run tells the user
    to type to continue it.

    Under torchrun, the run's processes train it together (see tessera.train.distributed); the first one writes
    into OUT and logs, and every one returns the trained model."""
    started = time.perf_counter()
    processes = join()
    try:
        processes.check_batch_size(run.batch_size)
        if not processes.main:  # the main process says it all, once
            log, progress = (lambda *_: None), False
        return _run_training(run, log, progress, resume, started, processes, resume_command)
    finally:
        leave(processes)


def _run_training(run: RunConfig, log, progress: bool, resume: str | Path | bool | None, started: float,
                  processes: Processes, resume_command: str) -> dict[str, Any]:
    if run.threads:
        torch.set_num_threads(run.threads)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", processes.count))  # this machine's processes
    if local > 1 and torch.get_num_threads() * local > (os.cpu_count() or 1):
        # threads waiting at every barrier for a core another process holds: several times slower, not faster
        log(f"warning: {local} processes × {torch.get_num_threads()} threads on {os.cpu_count()} cores; threads: "
            f"is per process, expected processes × threads ≤ cores")
    torch.manual_seed(run.seed)
    data_dir, out = Path(run.data), Path(run.out)
    train_file = split_file(data_dir, "train")
    stages = build_stages(run)
    if any(s.data == "text" and s.steps for s in stages) and not (data_dir / "text_train.jsonl").is_file():
        raise DataError(f"{data_dir / 'text_train.jsonl'}: no such file; the text pretraining stage needs it "
                        f"(or set llm_checkpoint to start from a trained LLM)")
    # stages[0]: text (there is none from a pretrained LLM or whole model)
    if not (run.llm_checkpoint or run.init_checkpoint) and not stages[0].steps and any(s.steps for s in stages[1:]):
        # not an error: an untrained LLM can be the experiment
        log("warning: steps.text is 0 and there is no llm_checkpoint, so the multimodal stages train on an untrained "
            "LLM (random weights); for an LLM that reads, set llm_checkpoint to a trained LLM or steps.text > 0")
    if run.llm_checkpoint:  # named, not its tokenizer.json's absence
        check_llm_checkpoint(Path(run.llm_checkpoint))
    if run.llm_checkpoint and run.steps.get("text"):  # allowed (a file written for both ways), but said
        log(f"note: steps.text={run.steps['text']} is not used: llm_checkpoint {run.llm_checkpoint} is a trained LLM, "
            f"so the run skips text pretraining")
    if run.llm_checkpoint and run.tokenizer:
        check_same_tokenizer(run.tokenizer, run.llm_checkpoint)
    if run.init_checkpoint and run.tokenizer:
        check_same_tokenizer(run.tokenizer, run.init_checkpoint, "init_checkpoint")
    if resume is True and not out.is_dir():  # a mistyped OUT: no directory made for it before saying so
        raise CheckpointError(f"{out}: no such directory, so no resumable checkpoint in it; expected the out of a "
                              f"run that saved one")
    made = processes.main and not out.exists()
    if processes.main:  # the only process that writes into it
        out.mkdir(parents=True, exist_ok=True)
    # from before the session reads OUT (another session may be writing into it) until it returns or raises
    lock = training_lock(out, log) if processes.main else contextlib.nullcontext()
    with lock, stop_signals_interrupt(log):
        try:
            return _training_session(run, data_dir, out, train_file, stages, log, progress, resume, started,
                                     processes, resume_command)
        except BaseException:
            # a run that stopped before writing anything (bad data, say) leaves no empty OUT made for it behind —
            # removed while this session still holds the lock (a session refused by it never gets here)
            if made and {p.name for p in out.iterdir()} <= {LOCK_FILE}:
                shutil.rmtree(out, ignore_errors=True)
            raise


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP during training — `kill`, `timeout`, a scheduler's preemption (SLURM, Kubernetes, `docker
    stop`), a closed terminal — taken as Ctrl-C is: the stage saves what it has learned into OUT/interrupted, for
    --resume. By default either signal ends the process at once, losing every step since the last checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def stop_signals_interrupt(log):
    """While training, SIGTERM and SIGHUP raise Stopped. Only the first: a scheduler's repeated SIGTERM would
    otherwise break off the very save it asks for (SIGKILL, which nothing catches, still ends the process)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    stopping = []

    def stop(signum, _frame):
        if stopping:
            log(f"{signal.Signals(signum).name} again: still saving")
            return
        stopping.append(signum)
        raise Stopped(signum)

    wanted = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]  # no SIGHUP on Windows
    previous = {signum: signal.signal(signum, stop) for signum in wanted}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def raise_advising_another(error: CheckpointError, out: Path, source: Path | None, resume) -> None:
    """Raise `error`, about the checkpoint --resume picked, with the newest other one to continue from, if any."""
    advice = another_to_resume_from(out, source) if resume is True else ""
    if not advice:
        raise error
    raise CheckpointError(f"{error}{advice}") from error


def check_llm_checkpoint(path: Path) -> None:
    """ConfigError unless `path` is a checkpoint directory. The likeliest slip is a run's OUT (or OUT/checkpoints)
    for its text stage's checkpoint, which is then named."""
    expected = ("expected the checkpoint directory of a trained LLM (a text-stage checkpoint: "
                "OUT/checkpoints/stage-0-text)")
    if path.is_file():
        raise ConfigError(f"llm_checkpoint={path}: a file; {expected}")
    if not path.is_dir():
        raise ConfigError(f"llm_checkpoint={path}: no such directory; {expected}")
    missing = [name for name in ("config.json", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        # in a run's OUT, its checkpoints directory, or a quickstart's --out
        text_stages = [where / "stage-0-text" for where in (path / "checkpoints", path, path / "run" / "checkpoints")]
        text_stage = next((where for where in text_stages if (where / "config.json").is_file()), None)
        hint = f" ({text_stage}?)" if text_stage else ""
        raise ConfigError(f"llm_checkpoint={path}: no {' or '.join(missing)} in it, so not a checkpoint{hint}; "
                          f"{expected}")


def _training_session(run: RunConfig, data_dir: Path, out: Path, train_file: Path, stages: list[Stage], log,
                      progress: bool, resume: str | Path | bool | None, started: float,
                      processes: Processes, resume_command: str) -> dict[str, Any]:
    """run_training's work in OUT, under its lock."""
    source = None
    try:
        source = (latest_resumable(out) if resume is True else Path(resume)) if resume else None
        resumed = load_state(source) if source else None
    except CheckpointError as e:
        raise_advising_another(e, out, source, resume)
    if resume is True:
        check_the_newest_is_where_the_run_left_off(out, source, resumed)
    processor = None
    if run.init_checkpoint:
        # the whole model's own tokenizer, chat template and image processing — a resumed run's, saved with it, are
        # the same — with the run's length limit
        processor = Processor.from_pretrained(source or run.init_checkpoint)
        processor.config = dataclasses.replace(processor.config, max_length=run.max_length)
        config = model_config(run, None)
    else:
        tokenizer_file = run.tokenizer or (str(Path(run.llm_checkpoint) / "tokenizer.json") if run.llm_checkpoint
                                           else None)
        if source:  # the tokenizer the run has been training with, not one trained anew
            tokenizer_file = source / "tokenizer.json"
        if tokenizer_file:  # a pretrained LLM comes with the tokenizer it was trained with
            tokenizer = load_tokenizer(tokenizer_file)
        else:  # trained once, by the main process, so that every process has the very same vocabulary
            trained = train_tokenizer(dataset_texts(data_dir), run.vocab_size).to_str() if processes.main else None
            tokenizer = Tokenizer.from_str(processes.same_as_main(trained))
        config = model_config(run, padded_vocab(tokenizer.get_vocab_size()))
    files = [train_file, data_dir / "text_train.jsonl", data_dir / "text_test.jsonl"]
    # "auto" decided once, by the main process: machines with and without native bf16 must not mix their shares
    precision = processes.same_as_main(training_precision(run.precision))
    fingerprint = run_fingerprint(run, stages, config, precision, {path.name: path for path in files})
    if resumed:  # the checkpoint's weights (an llm_checkpoint's LLM, an init_checkpoint's model are in them already)
        try:
            check_same_run(resumed.fingerprint, fingerprint, source)
        except ConfigError as e:  # the newest checkpoint may be another run's, written into the same OUT later
            advice = one_this_run_continues(out, fingerprint, source) if resume is True else ""
            if not advice:
                raise
            raise ConfigError(f"{e}{advice}") from None
        # a pretrained whole model is not initialised at random only to be overwritten
        with parameters_on_meta() if run.init_checkpoint else contextlib.nullcontext():
            model = MultimodalLM(config)
        try:
            load_weights(model, source, torch.float32 if run.init_checkpoint else None)
        except CheckpointError as e:
            raise_advising_another(e, out, source, resume)
    elif run.init_checkpoint:
        # float32 whatever it is stored in (a bf16 conversion too): the trainer's weights are its master copy, and
        # bf16-mixed precision rounds only the products
        model = MultimodalLM.from_pretrained(run.init_checkpoint, dtype=torch.float32)
    else:
        model = MultimodalLM(config)
        if run.llm_checkpoint:
            pretrained = MultimodalLM.from_pretrained(run.llm_checkpoint)
            check_same_llm(pretrained.config, model.config, run.llm_checkpoint)
            model.llm.load_state_dict(pretrained.llm.state_dict())
    processes.same_weights_as_main(model)
    if run.compile:
        model.compile()
    processor = processor or Processor.for_model(model.config, tokenizer, max_length=run.max_length)
    cache: dict = {}
    train_examples, report = load_examples(train_file, processor, strict=run.strict, image_cache=cache)
    log(report.summary())
    text_examples: list[EncodedExample] = []
    # read only for a text stage still to run: a fine-tune (no text stage) was stopped by a bad record there (--strict)
    if any(s.data == "text" and s.steps for s in stages[resumed.stage if resumed else 0:]):
        text_examples, text_report = text_pretraining_examples(data_dir / "text_train.jsonl", processor, run.strict)
        log(text_report.summary())
    else:
        text_report = None
    for examples, file_report in ((train_examples, report), (text_examples, text_report)):
        if file_report is not None:
            processes.check_same_records(file_report.source, [e.example.id for e in examples],
                                         dict(file_report.reasons))
    # every stage's records are checked now, not when the stage starts after hours of the earlier ones
    check_stage_data(stages, train_examples, report, text_examples, text_report, processes.count,
                     first=resumed.stage if resumed else 0)
    settings = TrainSettings(batch_size=run.batch_size, grad_accum=run.grad_accum, warmup=run.warmup,
                             decay=run.decay, min_lr_ratio=run.min_lr_ratio,
                             clip=run.clip, weight_decay=run.weight_decay, gate_lr_scale=run.gate_lr_scale,
                             checkpoint_every=run.checkpoint_every, keep_checkpoints=run.keep_checkpoints,
                             group_by_length=run.group_by_length,
                             seed=run.seed, progress=progress, precision=precision,
                             processes=processes)
    if run.init_checkpoint:
        generation = Path(run.init_checkpoint) / GENERATION_CONFIG_NAME
        settings.kept_files = {generation.name: generation.read_bytes()} if generation.is_file() else {}
    log(f"precision: {settings.precision}" + (f" (asked for {run.precision})" if run.precision == "auto" else ""))
    held_out = []
    if (data_dir / "text_test.jsonl").is_file() and processes.main:  # measured and reported by the main process alone
        held_out, held_out_report = load_examples(data_dir / "text_test.jsonl", processor, strict=run.strict,
                                                  text_only=True)
        log(held_out_report.summary())
    # a resumed run has measured it already, on the model as it was before the multimodal stages
    text_loss = {"before": resumed.text_loss_before} if resumed and resumed.text_loss_before is not None else {}
    metrics_path = out / "metrics.jsonl"
    processes.wait_for_all()  # every process has read OUT: the main one may write into it now
    if processes.main:
        settings.run = metrics_run(metrics_path, resumed, source, log)
        record_session(out, settings.run, resumed.step if resumed else 0, source)
    settings.run = processes.same_as_main(settings.run)

    def training_state(index: int, stage_start: int, stage_state: StageState) -> TrainingState:
        """What resumes the run in stage `index` (len(stages) when every stage is done), which started at run step
        `stage_start`."""
        return TrainingState(run=settings.run, step=stage_start + stage_state.step, stage=index,
                             stage_name=stages[index].name if index < len(stages) else None,
                             text_loss_before=text_loss.get("before"), fingerprint=fingerprint,
                             stage_state=stage_state)

    if resumed:  # as it was at the checkpoint (nothing draws from it today; a dropout layer would)
        torch.set_rng_state(resumed.stage_state.rng)
    resumed_at = step = resumed.step if resumed else 0
    stage_losses = {}
    for index, stage in enumerate(stages):
        if resumed and index < resumed.stage:
            continue  # done before the run stopped
        if stage.data != "text" and "before" not in text_loss and held_out:
            # the article's question about Method B: does the LLM keep its text skills through multimodal training?
            text_loss["before"] = text_lm_loss(model, processor, held_out)
            log(f"held-out text loss before the multimodal stages: {text_loss['before']:.4f}")
        examples = select(train_examples, stage.data, text_examples)
        done: list[float] = []
        state = resumed.stage_state if resumed and index == resumed.stage else StageState(rng=torch.get_rng_state())
        stage_start = step - state.step  # its data order is seeded with the run step it started at
        try:
            train_stage(model, processor, stage, examples, settings, out, metrics_path, stage_start, log, losses=done,
                        state=state, checkpoint_state=functools.partial(training_state, index, stage_start))
        except BaseException as e:  # Ctrl-C or an error mid-stage: keep what this stage learned so far
            # (not weights that just gave a non-finite loss: they would only pass for good ones)
            if stage_start + state.step and not isinstance(e, TrainingError) and processes.main:
                save_interrupted(model, processor, out, settings.run, log,
                                 f"stopped in stage {stage.name!r} after {state.step} of its {stage.steps} steps "
                                 f"(run step {stage_start + state.step})",
                                 training_state(index, stage_start, state), settings.kept_files, resume_command)
            raise
        step = stage_start + state.step
        stage_losses[stage.name] = done[-1] if done else None
        name = checkpoint_name(settings.run, f"stage-{index}-{stage.name}")
        if processes.main:
            save_checkpoint(model, processor, out / "checkpoints" / name,
                            training_state(index + 1, step, StageState(rng=torch.get_rng_state())), out,
                            settings.kept_files)
    if held_out:
        text_loss["after"] = text_lm_loss(model, processor, held_out)
        log(f"held-out text loss after training: {text_loss['after']:.4f}")
    if processes.main:
        save_checkpoint(model, processor, out / "checkpoint", kept=settings.kept_files)
        for leftover in own_stops(out, settings.run):  # superseded now that this run has finished; other runs' stay
            shutil.rmtree(leftover)
            log(f"removed {leftover}, left when this run stopped; it has finished: {out / 'checkpoint'}")
        if step:
            plot_losses(metrics_path, out / "loss.png", settings.run)  # a resumed run may not be the latest
    return {"model": model, "processor": processor, "train_examples": train_examples, "text_examples": text_examples,
            "steps": step, "resumed_at": resumed_at, "final_losses": stage_losses,
            "text_loss_before": text_loss.get("before"), "text_loss_after": text_loss.get("after"),
            "precision": settings.precision, "train_seconds": time.perf_counter() - started,
            "main_process": processes.main}
