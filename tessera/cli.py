"""The `tessera` command: quickstart, data, train, eval, generate, serve, convert, export.

Every verb reports a bad input (a missing file, a checkpoint directory that isn't one, a corrupt image, an invalid
config value) as one line on stderr and exit status 2 — never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tessera.checkpoint import LOAD_DTYPES, check_directory_to_write
from tessera.errors import ConfigError, DataError, TesseraError
from tessera.linear import check_backend
from tessera.train.loop import PRECISIONS

DTYPES = ("float32", "bfloat16", "float16")
OVERWRITE_HELP = ("out_dir may hold another checkpoint (a config.json and a checkpoint's kinds of file only): it is "
                  "replaced once this one is written whole (without the flag, out_dir must be new or empty)")
LOAD_DTYPE_HELP = "weights in memory: auto = as a tessera checkpoint stores them, float32 for a Hugging Face " \
                  "directory (bfloat16 halves float32's memory)"


def _quickstart(args: argparse.Namespace) -> None:
    from tessera.quickstart import quickstart

    check_directory_to_write(args.out, f"--out {args.out}")
    quickstart(args.out, args.fusion, progress=not args.no_progress, precision=args.precision, resume=args.resume)


def _check_at_least(minimum: int, *flags: tuple[str, int | None]) -> None:
    """Integer flags out of range are one-line errors naming the flag, before anything is loaded or written."""
    for flag, value in flags:
        if value is not None and value < minimum:
            raise ConfigError(f"{flag} {value}: expected an integer >= {minimum}")


def _data(args: argparse.Namespace) -> None:
    from tessera.data.shapes import (MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, data_files_in, make_shapes_dataset,
                                     remove_data_files)

    _check_at_least(0, ("--train", args.train), ("--test", args.test), ("--text-train", args.text_train),
                    ("--text-test", args.text_test))
    if not MIN_IMAGE_SIZE <= args.image_size <= MAX_IMAGE_SIZE:  # 100000 had the process killed for its memory
        raise ConfigError(f"--image-size {args.image_size}: expected {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels")
    check_directory_to_write(args.out, f"--out {args.out}")
    held = data_files_in(args.out)
    if held and not args.overwrite:  # one's own records, replaced in silence
        raise ConfigError(f"--out {args.out}: holds {', '.join(held)} already; expected a new or empty directory "
                          f"(or --overwrite, to replace them with the shapes dataset)")
    if held:
        remove_data_files(args.out)
    summary = make_shapes_dataset(args.out, train=args.train, test=args.test, seed=args.seed,
                                  image_size=args.image_size, text_train=args.text_train, text_test=args.text_test,
                                  all_questions=args.all_questions)
    print(f"wrote {args.out}: " + ", ".join(f"{count} {name} records" for name, count in summary.items()))


def _train(args: argparse.Namespace) -> None:
    from tessera.train.run import RunConfig, run_training

    overrides = list(args.overrides) + (["strict=true"] if args.strict else [])
    run = RunConfig.load(args.config, overrides)
    result = run_training(run, progress=not args.no_progress, resume=args.resume_from or args.resume)
    if not result["main_process"]:  # under torchrun: the first process reports
        return
    resumed = f" (resumed at run step {result['resumed_at']})" if result["resumed_at"] else ""
    steps = result["steps"] - result["resumed_at"]
    print(f"trained {steps} step{'' if steps == 1 else 's'}{resumed} in {result['train_seconds']:.0f} s; "
          f"checkpoint: {Path(run.out) / 'checkpoint'}")


def _eval(args: argparse.Namespace) -> None:
    from tessera.eval.evaluate import check_results_path, evaluate, predictions_path
    from tessera.eval.report import metrics_table

    _check_at_least(1, ("--limit", args.limit), ("--max-new-tokens", args.max_new_tokens),
                    ("--batch-size", args.batch_size))
    if args.out:
        check_results_path(Path(args.out))
    for flag, path in (("--data", args.data), ("--text-data", args.text_data)):  # before a long model load
        if path is not None and not Path(path).is_file():
            what = "a directory" if Path(path).is_dir() else "no such file"
            raise DataError(f"{flag} {path}: {what}; expected a LLaVA .json list or a messages .jsonl file")
    model, processor = _load(args.checkpoint, args.dtype)
    data = Path(args.data)
    text_data = args.text_data
    if text_data is None and (data.parent / "text_test.jsonl").is_file():
        text_data = data.parent / "text_test.jsonl"  # the held-out text beside the data, when there is one
    metrics, predictions = evaluate(model, processor, data, text_data, batch_size=args.batch_size,
                                    limit=args.limit, strict=args.strict, max_new_tokens=args.max_new_tokens,
                                    text_data_optional=args.text_data is None)
    print(metrics_table(metrics, title=f"{args.checkpoint} on {data}"))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**metrics, "checkpoint": str(args.checkpoint), "data": str(data)}, indent=2) + "\n")
        predictions_path(out).write_text("".join(json.dumps(p) + "\n" for p in predictions))
        print(f"wrote {out}")


def _generate(args: argparse.Namespace) -> None:
    from tessera.generation import SamplingParams

    try:  # checked before the model loads, each error naming its flag rather than the setting behind it
        SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        setting, _, problem = str(e).partition("=")
        raise ConfigError(f"--{setting.replace('_', '-')} {problem}") from None
    model, processor = _load(args.checkpoint, args.dtype)
    messages = [processor.user_message(args.prompt, 1 if args.image else 0)]
    batch = processor([messages], [[args.image] if args.image else []], add_generation_prompt=True,
                      padding_side="left")
    batch.pop("labels")
    result = model.generate(**batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, tokenizer=processor)
    print(result.texts[0])


def _serve(args: argparse.Namespace) -> None:
    from tessera.serve import ServeSettings, serve

    settings = ServeSettings(
        checkpoint=args.checkpoint, served_model_name=args.served_model_name, api_key=args.api_key,
        max_images_per_prompt=args.max_images_per_prompt, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
        allowed_local_dir=args.allowed_local_dir, allow_remote_images=args.allow_remote_images,
        allowed_image_hosts=None if args.allowed_image_hosts is None else
        [host.strip() for host in args.allowed_image_hosts.split(",")],
        threads=args.threads, dtype=args.dtype, cors_origins=args.cors_origin,
        # only when given: ServeSettings holds the default (importing it here would load the web stack for --help)
        **({} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}),
    )
    serve(settings, host=args.host, port=args.port)


def _recipes(args: argparse.Namespace) -> None:
    from tessera.train.recipes import RECIPES

    for recipe in RECIPES.values():
        print(f"{recipe.name:<14s} fusion={recipe.fusion:<8s} {recipe.summary}")
        for stage in recipe.stages:
            print(f"    {stage.name:<10s} trains {', '.join(stage.train):<36s} on {stage.data}")


def _convert(args: argparse.Namespace) -> None:
    import torch

    from tessera.interop.convert import convert

    check_directory_to_write(args.out_dir, f"out_dir {args.out_dir}")
    out = convert(args.hf_dir, args.out_dir, getattr(torch, args.dtype), overwrite=args.overwrite)
    print(f"wrote {out}: a tessera checkpoint of {args.hf_dir}")


def _export(args: argparse.Namespace) -> None:
    from tessera.interop.export import export_hf

    check_directory_to_write(args.out_dir, f"out_dir {args.out_dir}")
    out = export_hf(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}: {args.checkpoint} in transformers' layout")


def _bench(args: argparse.Namespace) -> None:
    from tessera.bench import report, suite

    results = suite.run(quick=args.quick, compile=args.compile)
    print(report.markdown(results))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")


def _load(checkpoint: str, dtype: str = "auto"):
    from tessera.model import MultimodalLM
    from tessera.processor import Processor

    return MultimodalLM.from_pretrained(checkpoint, dtype=dtype), Processor.from_pretrained(checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Build, train, evaluate and serve multimodal LLMs.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("quickstart", help="make data, train a tiny model, evaluate it (about 5 minutes on a CPU "
                                            "with native bf16, about 10 without)")
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--fusion", choices=("unified", "cross", "hybrid"), default="unified",
                   help="unified: Method A with the llava recipe; cross: Method B with the llama3.2 recipe; hybrid: "
                        "NVLM-H with the nvlm-h recipe")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training precision; auto: bf16-mixed where the CPU has native bf16 matmuls, else fp32")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped quickstart (same --out, --fusion and --precision) from its newest "
                        "resumable checkpoint")
    p.set_defaults(run=_quickstart)

    p = verbs.add_parser("data", help="make a built-in dataset")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    shapes = kinds.add_parser("shapes", help="coloured shapes on a 3x3 grid, with captions and questions")
    shapes.add_argument("--out", required=True)
    shapes.add_argument("--train", type=int, default=3000, help="training scenes")
    shapes.add_argument("--test", type=int, default=300, help="test scenes")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--image-size", type=int, default=48)
    shapes.add_argument("--text-train", type=int, default=None, help="text-only scenes (default: --train)")
    shapes.add_argument("--text-test", type=int, default=500, help="held-out text-only scenes")
    shapes.add_argument("--all-questions", action="store_true",
                        help="a training image asks everything it answers, not one question of each kind")
    shapes.add_argument("--overwrite", action="store_true",
                        help="replace the dataset --out holds already (its split files and images; refused "
                             "without it)")
    shapes.set_defaults(run=_data)

    p = verbs.add_parser("train", help="train a run described by a YAML file")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", default=[], help="key=value, e.g. steps.instruct=400 lr.align=1e-3")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record instead of skipping it")
    p.add_argument("--no-progress", action="store_true")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run from the newest resumable checkpoint "
                                                              "under its out directory")
    resume.add_argument("--resume-from", default=None, metavar="DIR", help="continue the run from this resumable "
                                                                          "checkpoint")
    p.set_defaults(run=_train)

    p = verbs.add_parser("eval", help="answer each record's first question in a data file and score the answers")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="LLaVA .json or messages .jsonl")
    p.add_argument("--text-data", default=None, help="held-out text for the LM loss (default: text_test.jsonl "
                                                     "beside --data, left out with a warning if it cannot be used)")
    p.add_argument("--out", default=None, help="metrics JSON (predictions go beside it)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate only the file's first N records, a skipped "
                                                            "one among them counted (N >= 1; default: all)")
    p.add_argument("--max-new-tokens", type=int, default=48,
                   help="answer length limit in tokens; a longer answer is cut and scored as cut (default: 48)")
    p.add_argument("--strict", action="store_true")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="auto", help=LOAD_DTYPE_HELP)
    p.set_defaults(run=_eval)

    p = verbs.add_parser("generate", help="answer one prompt about one image")
    p.add_argument("--checkpoint", required=True, help="a tessera checkpoint or a Hugging Face LLaVA / Llama 3.2 "
                                                        "Vision directory")
    p.add_argument("--image", default=None, help="an image file (PNG, JPEG, …); none: a text-only prompt")
    p.add_argument("--prompt", required=True, help="the question; the image goes before it")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer length limit in tokens (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens only (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose "
                                                             "probabilities reach p (1: all)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="auto", help=LOAD_DTYPE_HELP)
    p.set_defaults(run=_generate)

    p = verbs.add_parser("convert", help="turn a Hugging Face LLaVA / Llama 3.2 Vision directory into a tessera "
                                         "checkpoint")
    p.add_argument("hf_dir", help="a local directory (e.g. from `hf download`); nothing is downloaded")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype the weights are stored in (default: float32, whatever the source's; bfloat16 "
                        "halves it)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_convert)

    p = verbs.add_parser("export", help="write a checkpoint in transformers' layout (LLaVA or Llama 3.2 Vision)")
    p.add_argument("checkpoint")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("hf",), default="hf", help="hf: loadable with transformers' from_pretrained")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(run=_export)

    p = verbs.add_parser("serve", help="serve a checkpoint: OpenAI-compatible chat API with images + web playground")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --checkpoint)")
    p.add_argument("--max-images-per-prompt", type=int, default=4)
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="pixels per image, and per image its preprocessing builds (padding, resizing); checked "
                        "from the header before decoding (default: 4096 x 4096 = 16777216)")
    p.add_argument("--max-batch", type=int, default=8, help="rows (requests x n) decoded together")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                   help="while rows are decoding, a newcomer's longer prompt is prefilled this many tokens at a time, "
                        "with a decode step of the running rows between chunks (0: in one go)")
    p.add_argument("--allowed-local-dir", default=None, help="allow file:// image URLs inside this directory")
    p.add_argument("--allow-remote-images", action="store_true", help="allow http(s):// image URLs (off: the "
                                                                       "server fetches nothing from elsewhere)")
    p.add_argument("--allowed-image-hosts", default=None, metavar="HOST[,HOST…]",
                   help="allow http(s):// image URLs from these hosts only (exact names, no redirects followed)")
    p.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="let web pages on ORIGIN (e.g. https://app.example.com; * for any) call the API from the "
                        "browser; repeatable (default: off, so only the server's own playground page can)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model (default: torch's; "
                                                             "1 is often fastest for small models on a busy CPU)")
    p.add_argument("--dtype", choices=LOAD_DTYPES, default="auto", help=LOAD_DTYPE_HELP)
    p.set_defaults(run=_serve)

    p = verbs.add_parser("bench", help="benchmark tessera against transformers and this CPU's matmul peak")
    p.add_argument("--json", default=None, help="write every measurement to this JSON file")
    p.add_argument("--quick", action="store_true", help="a reduced run (under a minute) that reports every figure")
    p.add_argument("--compile", action="store_true", help="measure tessera with torch.compile (MultimodalLM.compile)")
    p.set_defaults(run=_bench)

    p = verbs.add_parser("recipes", help="list the training recipes")
    p.set_defaults(run=_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # the train verb's key=value overrides may come after its flags too (`train run.yaml --no-progress seed=1`):
    # argparse leaves those over, and parse_intermixed_args does not take subcommands
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if args.verb != "train" or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    processes, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    # under torchrun, each process speaks for itself: the first as any run does, the others naming themselves
    who = f"tessera {args.verb}" + (f" (process {rank} of {processes})" if rank else "")
    if args.verb != "train" and processes > 1:
        # every process would do the whole job, into the same files (the quickstart's data, eval's predictions)
        if not rank:
            _say(f"{who}: error: started by torchrun (WORLD_SIZE={processes}), which only `tessera train` shares "
                 f"out; expected `tessera {args.verb}` in one process")
        return 2
    try:
        check_backend()  # an environment variable set wrong: said before any work, whatever the verb
        args.run(args)
    except (TesseraError, ValueError, OSError) as e:
        _say(f"{who}: error: {e}")
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or training's SIGTERM/SIGHUP (tessera.train.run.Stopped)
        signum = getattr(e, "signum", signal.SIGINT)
        if not rank:  # every process got it; the first one's line says so
            _say(f"{who}: interrupted ({signal.Signals(signum).name})")
        return 128 + signum  # as the shell reports a process the signal ended
    return 0


def _say(line: str) -> None:
    """One line on stderr in one write: the lines of processes writing at once do not run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
