"""Training-step time of the quickstart's tiny model in fp32 and bf16-mixed, stage by stage: the same dataset, model
and recipe as `tessera quickstart`, each stage's components and data, the two precisions timed interleaved
(A B A B …, a warm-up first) and the medians compared.

    python benchmarks/training_precision.py --fusion unified
    python benchmarks/training_precision.py --fusion cross --repeats 7 --steps 20

bf16-mixed only pays where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX); elsewhere it is emulated and
slower than fp32 — which is why the quickstart's precision "auto" picks it only there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from tessera.data.shapes import make_shapes_dataset
from tessera.quickstart import DATASET, DEFAULT_RECIPE, QUICKSTART_RUNS, scene_size
from tessera.train.loop import TrainSettings, train_stage
from tessera.train.run import RunConfig, build_stages, run_training, select, text_pretraining_examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusion", choices=sorted(DEFAULT_RECIPE), default="unified")
    parser.add_argument("--out", default="runs/training_precision")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    size = scene_size(args.fusion)
    data = out / ("data" if size == 48 else f"data_{size}px")  # kept between runs: one per scene size
    if not (data / "train.json").is_file():
        make_shapes_dataset(data, **DATASET, image_size=size)
    plan = {key: value for key, value in QUICKSTART_RUNS[args.fusion].items() if key != "steps"}
    run = RunConfig.from_dict({"recipe": DEFAULT_RECIPE[args.fusion], "data": str(data), "out": str(out / "run"),
                               "fusion": args.fusion, **plan, "precision": "fp32",
                               "steps": dict.fromkeys(QUICKSTART_RUNS[args.fusion]["steps"], 0)})
    built = run_training(run, log=lambda *_: None, progress=False)  # the model, processor and data; no steps
    model, processor = built["model"], built["processor"]
    examples = built["train_examples"]
    text, _ = text_pretraining_examples(data / "text_train.jsonl", processor)  # a run of 0 steps reads none
    print(f"fusion={args.fusion}, {torch.get_num_threads()} threads, {args.steps} steps × {args.repeats} repeats, "
          f"ms per step (median)")
    print(f"{'stage':18s} {'trains':34s} {'fp32':>8s} {'bf16-mixed':>11s} {'speed-up':>9s}")
    for stage in build_stages(run):
        stage.steps = args.steps
        chosen = select(examples, stage.data, text)
        times = {"fp32": [], "bf16-mixed": []}
        for repeat in range(args.repeats + 1):
            for precision in times:
                settings = TrainSettings(batch_size=run.batch_size, progress=False, precision=precision)
                started = time.perf_counter()
                train_stage(model, processor, stage, chosen, settings, out, out / "steps.jsonl", log=lambda *_: None)
                if repeat:  # the first round warms up
                    times[precision].append((time.perf_counter() - started) / args.steps * 1000)
        fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16-mixed"])
        print(f"{stage.name:18s} {', '.join(stage.train):34s} {fp32:8.1f} {bf16:11.1f} {fp32 / bf16:8.2f}×",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
