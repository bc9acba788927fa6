"""Accuracy against training time for the quickstart: the same dataset, tiny model and recipe as
`tessera quickstart`, with the last stage run longer and a checkpoint every --every steps; each checkpoint of the
multimodal stages is evaluated on the held-out test split.

    python benchmarks/quickstart_curve.py --fusion unified --last-stage-steps 4000 --every 500
    python benchmarks/quickstart_curve.py --fusion cross --last-stage-steps 4000 --every 500 --json curve.json

Training seconds are the stages' own clocks (evaluation and checkpoint writing excluded). The learning rate follows
the long run's schedule (the quickstart's: cosine or wsd per stage), so a point on the curve is a lower bound for a
run that stops there by design (a shorter run would anneal sooner).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

from tessera.data.shapes import make_shapes_dataset
from tessera.eval.evaluate import evaluate
from tessera.model import MultimodalLM
from tessera.processor import Processor
from tessera.quickstart import DATASET, DEFAULT_RECIPE, QUICKSTART_RUNS, scene_size
from tessera.train.loop import read_metrics
from tessera.train.recipes import get_recipe
from tessera.train.run import RunConfig, run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fusion", choices=sorted(DEFAULT_RECIPE), default="unified")
    parser.add_argument("--out", default="runs/curve")
    parser.add_argument("--last-stage-steps", type=int, default=4000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="training seed (the dataset is the quickstart's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--json", help="also write the curve here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(args.out)
    data = out / "data"
    make_shapes_dataset(data, **DATASET, image_size=scene_size(args.fusion))
    recipe = DEFAULT_RECIPE[args.fusion]
    last = get_recipe(recipe).stages[-1].name
    settings = copy.deepcopy(QUICKSTART_RUNS[args.fusion])
    settings["steps"][last] = args.last_stage_steps
    run = RunConfig.from_dict({"recipe": recipe, "data": str(data), "out": str(out / "run"), "fusion": args.fusion,
                               "checkpoint_every": args.every, "seed": args.seed, "threads": args.threads,
                               **settings})
    run_training(run, log=lambda *a: print(*a, file=sys.stderr), progress=False)

    records = read_metrics(out / "run" / "metrics.jsonl")
    latest = records[-1].get("run", 1)  # a rerun into the same out appends: this run's records only
    records = [r for r in records if r.get("run", 1) == latest]
    stage_of, seconds_at, done = {}, {}, 0.0  # global step → stage, training seconds since the first step
    for i, r in enumerate(records):
        stage_of[r["step"]] = r["stage"]
        seconds_at[r["step"]] = done + r["stage_seconds"]
        if i + 1 == len(records) or records[i + 1]["stage"] != r["stage"]:
            done += r["stage_seconds"]
    multimodal = {s.name for s in get_recipe(recipe).stages}
    curve = []
    for checkpoint in sorted((out / "run" / "checkpoints").glob("step-*")):
        step = int(checkpoint.name.split("-")[1])
        if stage_of.get(step) not in multimodal:
            continue
        model, processor = MultimodalLM.from_pretrained(checkpoint), Processor.from_pretrained(checkpoint)
        results, _ = evaluate(model, processor, data / "test.json")
        curve.append({"step": step, "stage": stage_of[step], "train_seconds": round(seconds_at[step], 1),
                      "exact_match": round(results["exact_match"], 4),
                      "by_type": {k: round(v, 3) for k, v in results["exact_match_by_type"].items()}})
        row = curve[-1]
        kinds = "  ".join(f"{k} {v:.2f}" for k, v in row["by_type"].items())
        print(f"step {step:5d} ({row['stage']:>8s})  {row['train_seconds']:7.1f} s  EM {row['exact_match']:.3f}"
              f"   {kinds}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"fusion": args.fusion, "recipe": recipe, "curve": curve}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
