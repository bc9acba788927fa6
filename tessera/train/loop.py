"""The training loop for one stage: freeze what the stage freezes, build per-component learning rates, and step
with warmup + cosine decay, gradient accumulation and clipping.

With accumulation the loss is the sum over every answer token of the accumulated micro-batches divided by their
total count — the mean over tokens of the whole step, not a mean of per-micro-batch means (which would weigh a
token of a short answer more than a token of a long one).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tessera.checkpoint import write_whole, written_whole_directory
from tessera.data.records import EncodedExample
from tessera.errors import TrainingError
from tessera.memory import available_memory
from tessera.model import COMPONENTS, MultimodalLM
from tessera.processor import Processor
from tessera.train.distributed import SINGLE, Processes
from tessera.train.recipes import SCHEDULES, Stage
from tessera.train.state import StageState, TrainingState, checkpoint_name, interrupted_directory, \
    prune_step_checkpoints, save_state

PRECISIONS = ("fp32", "bf16-mixed", "auto")


def training_precision(requested: str) -> str:
    """What "auto" means here: bf16-mixed where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX — about
    twice its float32 matmul rate), fp32 elsewhere (emulated bf16 would be slower than float32)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r}: expected one of {', '.join(PRECISIONS)}")
    if requested != "auto":
        return requested
    # private probes of PyTorch's CPU dispatch; a build without them counts as no native bf16
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return "bf16-mixed" if native else "fp32"


@dataclass
class TrainSettings:
    batch_size: int = 32
    grad_accum: int = 1
    warmup: float = 0.05  # fraction of the stage's steps
    min_lr_ratio: float = 0.1  # the schedule decays to this fraction of the peak
    decay: float = 0.2  # the fraction of a "wsd" stage (see Stage.schedule) spent decaying
    clip: float = 1.0
    weight_decay: float = 0.0  # AdamW's, on tensors of 2+ dims: biases, norm scales, gates never decay
    checkpoint_every: int = 0  # steps; 0 = only at the end of each stage
    keep_checkpoints: int = 0  # the newest step checkpoints of the run kept (resumable ones only); 0 = all
    # Method B's tanh gates start at 0, so the blocks behind them get no signal until the gates open; a larger
    # learning rate lets a short run open them (at the base rate they stay near 0 for thousands of steps).
    gate_lr_scale: float = 1.0
    # batch examples of similar length together: less padding, faster steps — but batches of alike examples (on
    # the shapes world: scenes with as many shapes) bias the gradient; the quickstart learned worse with it
    group_by_length: bool = False
    seed: int = 0
    progress: bool = True
    # "bf16-mixed": the forward runs under bf16 autocast (matmuls in bf16, attention, norms and the loss in
    # float32); weights, gradients and AdamW's state stay float32. See training_precision for "auto".
    precision: str = "fp32"
    run: int = 1  # written into every metrics record: runs into the same directory append to one metrics.jsonl
    processes: Processes = SINGLE  # torchrun's, each taking its share of every batch (see train/distributed.py)
    # written into every checkpoint as they are (name → bytes, read once when the run starts: the source may move
    # or change while it trains): an init_checkpoint's generation_config.json, whose sampling settings tessera does
    # not read but `tessera export` writes back
    kept_files: dict[str, bytes] = field(default_factory=dict)


def batches(examples: list[EncodedExample], processor: Processor, batch_size: int, seed: int,
            group_by_length: bool = False, skip: int = 0,
            processes: Processes = SINGLE) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a new permutation each epoch, from a seeded generator), but the first `skip`: a
    resumed stage draws the batches its uninterrupted run would have drawn next. Every process draws the same
    batches and keeps its share of their rows.

    With `group_by_length`, each run of 50 batches' worth of shuffled examples is sorted by length before it is cut
    into batches, and the batches are shuffled again — rows of a batch then have similar lengths, so little of the
    step is spent on padding (LLaVA's group_by_modality_length does the same), while the order stays random."""
    if not examples:
        raise ValueError("no examples to train on")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        if group_by_length:
            span = 50 * batch_size
            order = [i for start in range(0, len(order), span)
                     for i in sorted(order[start:start + span], key=lambda i: len(examples[i].input_ids))]
        starts = list(range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size))
        if group_by_length:
            starts = [starts[j] for j in torch.randperm(len(starts), generator=generator).tolist()]
        for start in starts:
            if skip:  # drawn before the interruption: the generator moves on as it did, nothing is padded
                skip -= 1
                continue
            chosen = processes.share([examples[i] for i in order[start:start + batch_size]])
            yield processor.pad_batch([(e.input_ids, e.labels) for e in chosen], [e.pixel_values for e in chosen])


def lr_lambda(steps: int, warmup_fraction: float, min_ratio: float, schedule: str = "cosine",
              decay_fraction: float = 0.2):
    """The learning-rate multiplier at each step: linear warmup, then cosine decay or warmup-stable-decay."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    warmup = max(1, int(round(steps * warmup_fraction)))
    decay_start = warmup if schedule == "cosine" else max(warmup, steps - int(round(steps * decay_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, steps - decay_start))
        if schedule == "wsd":
            return 1 - (1 - min_ratio) * progress
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def decay_groups(group: dict, weight_decay: float) -> list[dict]:
    """A parameter group split into the tensors that decay and those that don't: as in transformers' Trainer,
    biases and norm scales don't (nor Method B's gates) — the 1-D tensors, which decay would pull towards 0."""
    decay = {**group, "params": [p for p in group["params"] if p.dim() >= 2], "weight_decay": weight_decay}
    rest = {**group, "params": [p for p in group["params"] if p.dim() < 2], "weight_decay": 0.0,
            "name": f"{group['name']}.no_decay"}
    return [g for g in (decay, rest) if g["params"]]


def parameter_table(model: MultimodalLM) -> str:
    rows = [f"  {'component':16s} {'trainable':>12s} {'frozen':>12s}"]
    for name, count in model.parameter_counts().items():
        rows.append(f"  {name:16s} {count['trainable']:12,d} {count['total'] - count['trainable']:12,d}")
    return "\n".join(rows)


# What a stage adds to the weights already in memory: a gradient and AdamW's two moments for every trainable weight,
# each of the weight's size (12 bytes a parameter in float32); activations come on top
TRAINING_COPIES_PER_WEIGHT = 3


def warn_if_training_state_outgrows_memory(model: MultimodalLM, stage: Stage, log, held: int = 0,
                                           processes: int = 1) -> None:
    """A 7B model fine-tuned whole in float32 needs ~84 GB for its gradients and moments alone: on a smaller
    machine the kernel kills the run at its first step, minutes of loading later, without a word from tessera.
    Said before the first step (a warning: swap or a lazily allocated moment may still carry it). held: bytes of it
    in memory already (a resumed stage's moments); processes: this machine's, each holding its own."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    needed = processes * (TRAINING_COPIES_PER_WEIGHT * sum(p.numel() * p.element_size() for p in trainable) - held)
    memory = available_memory()
    if memory is None or needed <= memory[0]:
        return
    count = sum(p.numel() for p in trainable)
    each = f" in each of this machine's {processes} processes" if processes > 1 else ""
    log(f"warning: stage {stage.name!r} trains {_parameter_count(count)} parameters{each}, whose gradients and "
        f"AdamW moments take {needed / 2**30:.1f} GiB more, beyond the {memory[0] / 2**30:.1f} GiB available "
        f"(activations come on top); it will most likely run out of memory. Train fewer components in this stage, "
        f"or use a machine with more memory")


def _parameter_count(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M"


def _tensor_bytes(state) -> int:
    """Bytes of the tensors in a (nested) optimizer state."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(_tensor_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_bytes(v) for v in state)
    return 0


def train_stage(model: MultimodalLM, processor: Processor, stage: Stage, examples: list[EncodedExample],
                settings: TrainSettings, out_dir: Path, metrics_path: Path, first_step: int = 0,
                log=print, losses: list[float] | None = None, state: StageState | None = None,
                checkpoint_state: Callable[[StageState], TrainingState] | None = None) -> list[float]:
    """Run one stage; returns the per-step losses of the steps it ran (appended to `losses` when given). Appends one
    JSON line per step to metrics_path.

    `state` is where the stage stands: a resumable checkpoint's to continue from, and kept up to date as the stage
    goes on, so a caller whose run stops mid-stage finds in it what a continuation needs. `checkpoint_state` makes
    the run's training state of it: given, the checkpoints written every `checkpoint_every` steps are resumable.

    However the stage ends — done, interrupted or failed — the components it must not keep are put back."""
    state = StageState() if state is None else state
    if stage.steps == 0:  # (not a header and a table of what would have trained)
        log(f"stage {stage.name!r}: 0 steps, left out")
        return []
    model.freeze(*COMPONENTS)
    model.unfreeze(*stage.train)
    log(f"stage {stage.name!r}: {stage.steps} steps on {stage.data} ({len(examples)} examples), "
        f"training {', '.join(stage.train)}\n{parameter_table(model)}")
    frozen_by_rate = [name for name in stage.train if stage.lr * stage.lr_scale.get(name, 1.0) == 0]
    if frozen_by_rate:  # allowed (a way to freeze a component for one stage), but said: it may be a slip
        nothing = " (so the stage changes no weight)" if len(frozen_by_rate) == len(stage.train) else ""
        log(f"warning: stage {stage.name!r} trains {', '.join(frozen_by_rate)} at a learning rate of 0{nothing}")
    warn_if_training_state_outgrows_memory(model, stage, log, held=_tensor_bytes(state.optimizer),
                                           processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    restore = state.restore
    if stage.keep is not None and restore is None:  # snapshot what must come out of the stage unchanged
        restore = copy_components(model, [name for name in stage.train if name not in stage.keep])
    for name, weights in (state.in_progress or {}).items():  # put back when the run stopped; they go on training
        model.component(name).load_state_dict(weights)
    state.in_progress = None
    groups = []
    for name in stage.train:
        lr = stage.lr * stage.lr_scale.get(name, 1.0)
        named = [(n, p) for n, p in model.component(name).named_parameters() if p.requires_grad]
        gates = [p for n, p in named if n.endswith("_gate")]
        params = [p for n, p in named if not n.endswith("_gate")]
        if params:
            groups.append({"params": params, "lr": lr, "name": name})
        if gates:
            groups.append({"params": gates, "lr": lr * settings.gate_lr_scale, "name": f"{name}.gates"})
    if settings.weight_decay:  # (without decay the groups stay as they were: the same update, to the bit)
        groups = [split for group in groups for split in decay_groups(group, settings.weight_decay)]
    # fused: one kernel for the whole update instead of a handful of ops per tensor (0.7 against 3.2 ms a step for
    # the quickstart's model on CPU, where PyTorch's default is the per-tensor loop)
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay, betas=(0.9, 0.98), fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(
        stage.steps, settings.warmup, settings.min_lr_ratio, stage.schedule, settings.decay))
    if state.optimizer is not None:  # a resumed stage: the moments and the schedule where they were
        saved = len(state.optimizer.get("param_groups", ()))
        if saved != len(groups):  # torch's own error would name neither cause
            raise TrainingError(
                f"stage {stage.name!r}: the checkpoint's optimizer state has {saved} parameter groups where this "
                f"stage has {len(groups)}; with weight_decay > 0 a checkpoint saved before biases, norm scales and "
                f"gates were spared weight decay (two groups per component since) cannot be continued: start a new "
                f"run, or continue it with the tessera that saved it")
        optimizer.load_state_dict(state.optimizer)
        schedule.load_state_dict(state.schedule)
    trainable = [p for group in groups for p in group["params"]]
    bf16 = training_precision(settings.precision) == "bf16-mixed"
    processes = settings.processes
    data = batches(examples, processor, settings.batch_size, settings.seed + first_step, settings.group_by_length,
                   skip=state.step * settings.grad_accum, processes=processes)

    def current() -> StageState:
        state.optimizer, state.schedule, state.restore = optimizer.state_dict(), schedule.state_dict(), restore
        return state

    model.train()
    losses = [] if losses is None else losses
    stopped = True  # until the last step is done
    try:
        bar = tqdm(range(state.step, stage.steps), initial=state.step, total=stage.steps, desc=stage.name,
                   disable=not settings.progress, dynamic_ncols=True)
        stage_started = time.perf_counter()
        with open(metrics_path if processes.main else os.devnull, "a") as metrics:  # one writer of the records
            for step in bar:
                started = time.perf_counter()
                micro = [next(data) for _ in range(settings.grad_accum)]
                # the step's answer tokens in every process: each process's loss is its share of the step's mean
                num_tokens = int(processes.sum(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)))
                total = 0.0
                for batch in micro:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        loss = model(**batch, num_items_in_batch=num_tokens).loss
                    # rows that reach no trainable weight (text-only rows while Method B trains only its image path)
                    # give a loss without a graph: their gradient is zero, which is no gradient at all
                    if loss.requires_grad:
                        loss.backward()
                    total += loss.item()
                total = processes.sum(total)
                processes.sum_gradients(trainable)
                if settings.clip:
                    norm = torch.nn.utils.clip_grad_norm_(trainable, settings.clip)
                else:  # no clipping, but the norm is still what tells a non-finite gradient (not applied below)
                    norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
                # a NaN/inf step would turn every weight into NaN, and every later checkpoint: stop before it
                if not math.isfinite(total) or (norm is not None and not math.isfinite(float(norm))):
                    raise TrainingError(
                        f"stage {stage.name!r}, step {step + 1} (run step {first_step + step + 1}): the loss is "
                        f"{total} and the gradient norm {None if norm is None else float(norm)}; stopped before "
                        f"applying the step (the checkpoints written so far are kept). Expected finite values: try "
                        f"a lower lr.{stage.name} (now {stage.lr:g})" + ("" if settings.clip else " or clip > 0"))
                state.mid_update = True  # until the step is counted: stopped here, the weights are of no step
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                lr = optimizer.param_groups[0]["lr"]
                schedule.step()
                samples_per_s = settings.batch_size * settings.grad_accum / (time.perf_counter() - started)
                losses.append(total)
                record = {"run": settings.run, "stage": stage.name, "step": first_step + step + 1,
                          "stage_step": step + 1, "loss": total, "lr": lr, "samples_per_s": round(samples_per_s, 1),
                          "tokens": num_tokens, "grad_norm": None if norm is None else float(norm),
                          "stage_seconds": round(time.perf_counter() - stage_started, 3)}
                metrics.write(json.dumps(record) + "\n")
                state.step, state.rng, state.mid_update = step + 1, torch.get_rng_state(), False
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_per_s:.0f}")
                if (settings.checkpoint_every and (first_step + step + 1) % settings.checkpoint_every == 0
                        and processes.main):
                    metrics.flush()  # a resumed run goes on from the checkpoint's step: its records are on disk
                    name = checkpoint_name(settings.run, f"step-{first_step + step + 1:06d}")
                    written = save_checkpoint(model, processor, out_dir / "checkpoints" / name,
                                              checkpoint_state and checkpoint_state(current()), out_dir,
                                              settings.kept_files)
                    if settings.keep_checkpoints:  # only once the new one is whole
                        for old, error in prune_step_checkpoints(out_dir, settings.run, settings.keep_checkpoints,
                                                                 written):
                            log(f"removed {old} (keep_checkpoints: {settings.keep_checkpoints})" if error is None
                                else f"warning: could not remove {old} (keep_checkpoints: "
                                     f"{settings.keep_checkpoints}): {error}; training goes on")
        stopped = False
    except BaseException:
        if not state.mid_update:  # what the continuation needs, before the finally puts components back
            current()
            state.in_progress = copy_components(model, restore) if restore else None
        raise
    finally:
        if restore:
            for name, weights in restore.items():
                model.component(name).load_state_dict(weights)
            if stopped:  # not "kept": the stage did not finish; its training of them is in the resumable state
                log(f"stage {stage.name!r} stopped: {', '.join(restore)} put back as they were before it")
            else:
                log(f"stage {stage.name!r}: kept the trained {', '.join(stage.keep)}; restored {', '.join(restore)}")
        model.eval()
    return losses


def copy_components(model: MultimodalLM, names) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in model.component(name).state_dict().items()} for name in names}


def save_checkpoint(model: MultimodalLM, processor: Processor, directory: Path,
                    state: TrainingState | None = None, out: Path | None = None,
                    kept: dict[str, bytes] | None = None) -> Path:
    """The weights, tokenizer and processor settings, and the `kept` files as they are; with `state`, the training
    state that makes the checkpoint resumable (see tessera.train.state), numbered after the other resumable
    checkpoints of `out`, the run's OUT."""
    if state is not None and out is None:
        raise ValueError(f"{directory}: a resumable checkpoint needs the run's OUT, which numbers its saves")
    with written_whole_directory(directory) as saving:  # an earlier save there stays whole until this one is
        model.save_pretrained(saving)
        processor.save_pretrained(saving)
        for name, data in (kept or {}).items():
            (saving / name).write_bytes(data)
        if state is not None:
            save_state(saving, state, out)
    return directory


# what a stopped run tells the user to type (the quickstart, which has no run config, tells its own)
RESUME_COMMAND = "tessera train CONFIG --resume (with the same overrides, if any)"


def save_interrupted(model: MultimodalLM, processor: Processor, out: Path, run: int, log, where: str,
                     state: TrainingState | None = None, kept: dict[str, bytes] | None = None,
                     resume_command: str = RESUME_COMMAND) -> None:
    """Save into OUT/interrupted (OUT/run-N-interrupted for run N > 1) the model of a run that stops mid-stage, so
    the steps since the last checkpoint are not lost — unless its weights are no longer finite (they would only
    hide the good checkpoints) — with the training state, unless it stopped while a step was being applied."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        log(f"{where}; its weights are no longer finite, so they were not saved")
        return
    resumable = state is not None and not state.stage_state.mid_update
    directory = interrupted_directory(out, run)
    try:
        save_checkpoint(model, processor, directory, state if resumable else None, out, kept)
    except Exception as e:  # the error that stopped the run matters more than this one
        log(f"{where}; saving the model to {directory} failed too: {e}")
        return
    if resumable:
        log(f"{where}: saved the model and the training state to {directory}; continue the run with: "
            f"{resume_command}")
    else:
        log(f"{where}: saved the model as it was to {directory} (weights only: it stopped while a step was being "
            f"applied; --resume continues from the latest checkpoint instead)")


def read_metrics(metrics_path: Path) -> list[dict]:
    """The step records of metrics.jsonl; a line a killed run left half-written is passed over."""
    return [record for _, record in _metrics_lines(metrics_path) if "stage" in record]


def _metrics_lines(metrics_path: Path) -> Iterator[tuple[str, dict]]:
    """Each line of metrics.jsonl that holds a JSON object, and that object."""
    for line in metrics_path.read_text().splitlines() if metrics_path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield line, record


def drop_metrics_after(metrics_path: Path, run: int, step: int) -> int:
    """Remove run `run`'s records past `step` — steps a resumed run is about to take again — and a line a killed
    run left half-written (the next record would be appended to it); returns how many records were removed."""
    lines = list(_metrics_lines(metrics_path))
    kept = [line for line, record in lines if not (record.get("run", 1) == run and record.get("step", 0) > step)]
    if metrics_path.is_file():
        write_whole(metrics_path, "".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def plot_losses(metrics_path: Path, png_path: Path, run: int | None = None) -> Path:
    """The loss curve of run `run` of metrics.jsonl (default: the latest), one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if run is None:  # earlier runs into the same directory are not drawn
        run = max(r.get("run", 1) for r in records)
    records = [r for r in records if r.get("run", 1) == run]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for stage in dict.fromkeys(r["stage"] for r in records):
        points = [(r["step"], r["loss"]) for r in records if r["stage"] == stage]
        ax.plot(*zip(*points), label=stage, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
