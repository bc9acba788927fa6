"""`tessera quickstart`: the first thing a newcomer runs — make the shapes dataset, train a tiny multimodal LLM
from nothing with the article's recipe for the chosen fusion, evaluate it on scenes it has never seen, and print
what it learned.

    tessera quickstart --out runs/quickstart --fusion unified     # LLaVA's recipe (Method A)
    tessera quickstart --out runs/quickstart --fusion cross       # Llama 3.2's recipe (Method B, LLM frozen)
    tessera quickstart --out runs/quickstart --fusion hybrid      # NVLM-H's recipe (thumbnail + tiles)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tessera.data.shapes import make_shapes_dataset
from tessera.errors import CheckpointError
from tessera.eval.evaluate import evaluate
from tessera.eval.report import metrics_table
from tessera.train.run import RunConfig, run_training

DEFAULT_RECIPE = {"unified": "llava", "cross": "llama3.2", "hybrid": "nvlm-h"}

# Stage lengths that fit a 300 s budget on a 2-core CPU (the README reports what they reach). Method A: a short
# text stage held at its peak rate (wsd) leaves time for a long projector alignment, which teaches the LLM to read
# image tokens the way it reads a scene described in words — the question stage then learns the lookups (where is
# the X?) in far fewer steps. Method B's gates learn faster so a short run can open them (see
# TrainSettings.gate_lr_scale).
QUICKSTART_RUNS: dict[str, dict[str, Any]] = {
    "unified": {"steps": {"text": 150, "encoder_pretrain": 300, "align": 400, "instruct": 1500},
                "schedule": {"text": "wsd"}},
    "cross": {"steps": {"text": 150, "pretrain": 700, "finetune": 1300}, "schedule": "wsd", "gate_lr_scale": 100.0},
    # the hybrid: every stage held at its peak rate (wsd) and a longer alignment than Method A's, as Method B's plan
    # (exact match 0.827 with the unified plan, 0.872 with wsd everywhere, 0.894 with the longer alignment too)
    "hybrid": {"steps": {"text": 150, "encoder_pretrain": 300, "align": 700, "finetune": 1200}, "schedule": "wsd",
               "gate_lr_scale": 100.0},
}
DATASET = {"train": 3000, "test": 300, "seed": 0}


def scene_size(fusion: str) -> int:
    """Pixels the quickstart draws its scenes at: the encoder's 48, or for the hybrid twice that — its thumbnail
    sees the whole scene at 48 px and the four 48 px tiles of its 2x2 grid see it at full resolution (at 48 px every
    scene would be one tile, the thumbnail again)."""
    return 96 if fusion == "hybrid" else 48


def quickstart(out: str | Path = "runs/quickstart", fusion: str = "unified", log=print,
               progress: bool = True, precision: str = "auto", resume: bool = False) -> dict[str, Any]:
    """Run the whole job; returns the metrics written to OUT/metrics.json. precision: see RunConfig — "auto" trains
    in bf16-mixed where the CPU multiplies bf16 natively (the stage plans were sized with it), fp32 elsewhere.
    resume: continue a stopped quickstart's training from its newest resumable checkpoint (the same out, fusion
    and precision; the dataset is made again, the same to the byte)."""
    if fusion not in DEFAULT_RECIPE:
        raise ValueError(f"fusion={fusion!r}: expected one of {', '.join(DEFAULT_RECIPE)}")
    started = time.perf_counter()
    out = Path(out)
    if resume and not (out / "run").is_dir():  # said before the dataset is drawn, and naming the --out given
        raise CheckpointError(f"--out {out}: no quickstart to resume in it (no {out / 'run'}); expected the --out of "
                              f"a quickstart that was stopped, or no --resume to start one")
    data = out / "data"
    log(f"making the shapes dataset in {data} ({DATASET['train']} training and {DATASET['test']} test scenes)")
    make_shapes_dataset(data, **DATASET, image_size=scene_size(fusion))
    recipe = DEFAULT_RECIPE[fusion]
    run = RunConfig.from_dict({"recipe": recipe, "data": str(data), "out": str(out / "run"), "fusion": fusion,
                               **QUICKSTART_RUNS[fusion], "precision": precision})  # the caller's precision wins
    again = f"tessera quickstart --out {out} --fusion {fusion} --precision {precision} --resume"
    trained = run_training(run, log=log, progress=progress, resume=resume or None, resume_command=again)
    model, processor = trained["model"], trained["processor"]
    checkpoint = out / "checkpoint"
    model.save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    results, predictions = evaluate(model, processor, data / "test.json")
    metrics = {
        "fusion": fusion, "recipe": recipe,
        "exact_match": results["exact_match"], "exact_match_by_type": results["exact_match_by_type"],
        "cider": results.get("cider"), "bleu4": results.get("bleu4"),
        "questions": results["questions"], "captions": results["captions"],
        "text_loss_before": trained["text_loss_before"], "text_loss_after": trained["text_loss_after"],
        "precision": trained["precision"], "train_seconds": round(trained["train_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "steps": trained["steps"], "checkpoint": str(checkpoint),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    log("")
    log(metrics_table(metrics, title=f"tessera quickstart: fusion={fusion}, recipe={recipe}"))
    log("\nexamples (held-out scenes):")
    for p in _examples(predictions):
        log(f"  {p['id']:<22s} {p['question']:<34s} → {p['prediction']!r}  (reference {p['reference']!r})")
    log(f"\nwrote {out / 'metrics.json'}, the checkpoint in {checkpoint} and the loss curve {out / 'run' / 'loss.png'}")
    return metrics


def _examples(predictions: list[dict], count: int = 3) -> list[dict]:
    """A caption and two questions of different kinds, the first of each in file order."""
    picked, kinds = [], set()
    for p in predictions:
        kind = "caption" if p["type"] == "caption" else "question"
        if p["type"] not in kinds and (kind == "caption" or len(picked) < count - 1 or "caption" in kinds):
            picked.append(p)
            kinds.add(p["type"])
        if len(picked) == count:
            break
    return picked
