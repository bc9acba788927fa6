"""Evaluation: generate an answer for every record and score it — exact match per question type, CIDEr/BLEU-4
for captions — plus the text-only LM loss on held-out text (the article's "does the LLM keep its text skills")."""

from __future__ import annotations

import os
import sys
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch

from tessera.config import is_integer
from tessera.data.records import EncodedExample, RecordError, SkipReport, in_model_placeholders, load_examples
from tessera.errors import ConfigError, DataError
from tessera.eval.metrics import caption_scores, exact_match
from tessera.model import MultimodalLM
from tessera.processor import IGNORE_INDEX, Processor
from tessera.text.tokenizer import IMAGE


def answer_all(model: MultimodalLM, processor: Processor, examples: list[EncodedExample], batch_size: int = 64,
               max_new_tokens: int = 48, prompts: dict[int, tuple] | None = None) -> list[str]:
    """Greedy answers to each example's first user turn (its reference answer is left out of the prompt).
    prompts: examples' prompts encoded already (see _prompt), by id() of the example."""
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows = [(prompts or {}).get(id(e)) or _prompt(processor, e) for e in chunk]
        batch = processor.pad_batch([(ids, labels) for ids, labels, _ in rows], [images for *_, images in rows],
                                    padding_side="left")
        batch.pop("labels")
        result = model.generate(**batch, max_new_tokens=max_new_tokens, tokenizer=processor)
        answers += result.texts
    return answers


def _prompt(processor: Processor, encoded: EncodedExample) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """(ids, labels, images) of the prompt an answer is generated from: the turns before the first answer."""
    prompt = encoded.example.messages[:_first_answer(encoded)]
    ids, labels, _ = processor.encode(in_model_placeholders(processor, prompt), add_generation_prompt=True)
    # a multi-turn record's later turns may hold images too: only the prompt's go in, in order
    return ids, labels, encoded.pixel_values[:sum(m["content"].count(IMAGE) for m in prompt)]


def _first_answer(encoded: EncodedExample) -> int:
    return next(i for i, m in enumerate(encoded.example.messages) if m["role"] == "assistant")


def _check_prompt_leaves_room(processor: Processor, max_positions: int, max_new_tokens: int,
                              prompts: dict[int, tuple], encoded: EncodedExample) -> None:
    """A record whose prompt + max_new_tokens exceeds the model's positions is a bad record too (skipped and
    counted, or under strict an error naming it), found when the data is read, not as the failure of a whole batch
    after the other records' answers were computed. The prompt encoded goes into `prompts`, for answer_all."""
    try:
        prompt = _prompt(processor, encoded)
    except DataError as e:  # an imported chat template refusing the prompt on its own
        raise RecordError("refused by the chat template", str(e)) from None
    if len(prompt[0]) + max_new_tokens > max_positions:
        raise RecordError("prompt too long to answer",
                          f"its {len(prompt[0])} tokens + max_new_tokens={max_new_tokens} exceed the model's "
                          f"text.max_position_embeddings={max_positions}")
    prompts[id(encoded)] = prompt


def score_answers(examples: list[EncodedExample], answers: list[str]) -> dict:
    """{"exact_match", "exact_match_by_type", "questions", "cider", "bleu4", "captions"}."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    caption_refs, caption_preds = {}, {}
    for i, (e, answer) in enumerate(zip(examples, answers)):
        reference = e.example.messages[_first_answer(e)]["content"]
        kind = e.example.type or "question"
        if kind == "caption":
            caption_refs[str(i)] = [reference]
            caption_preds[str(i)] = answer
        else:
            by_type[kind].append(exact_match(answer, reference))
    hits = [h for values in by_type.values() for h in values]
    result = {
        "exact_match": sum(hits) / len(hits) if hits else None,
        "exact_match_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "questions": len(hits),
        "captions": len(caption_preds),
    }
    if caption_preds:
        result |= caption_scores(caption_refs, caption_preds)
    return result


def predictions_path(out: Path) -> Path:
    """Where the per-record predictions go beside the metrics JSON `out`."""
    return out.with_suffix(".predictions.jsonl")


def _held_out_text(path: str | Path, processor: Processor, strict: bool
                   ) -> tuple[list[EncodedExample], SkipReport]:
    examples, report = load_examples(path, processor, strict=strict, text_only=True)
    if report.skipped:
        print(report.summary())
    if not examples:  # a loss over no tokens would be 0/0
        reasons = report.reasons_line
        error = DataError(f"{path}: no usable held-out text records ({report.skipped} skipped"
                          f"{': ' + reasons if reasons else ''}); expected text-only conversations ending with an "
                          f"assistant turn")
        error.report = report  # the metrics JSON's text_records say why too
        raise error
    return examples, report


def check_results_path(out: Path, flag: str = "--out") -> None:
    """ConfigError unless the metrics JSON `out` and the predictions beside it can be written: checked before the
    model loads, as an unwritable path found after the answers are computed loses them all."""
    if out.is_dir():
        raise ConfigError(f"{flag} {out}: is a directory; expected a file path for the metrics JSON (the predictions "
                          f"go beside it)")
    predictions = predictions_path(out)
    if predictions.is_dir():
        raise ConfigError(f"{flag} {out}: {predictions}, where the predictions go, is a directory; expected no "
                          f"directory there")
    for target in out, predictions:
        if target.exists() and not os.access(target, os.W_OK):
            raise ConfigError(f"{flag} {out}: {target} is not writable; expected a file path that can be written")
    ancestor = next(p for p in out.parents if p.exists())  # the directories below it are made when writing
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {out}: {ancestor} is a file, not a directory; expected a path whose parents are "
                          f"directories or can be made")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: the directory {ancestor} is not writable")


@torch.inference_mode()  # as generate: no autograd bookkeeping; only a float leaves
def text_lm_loss(model: MultimodalLM, processor: Processor, examples: list[EncodedExample],
                 batch_size: int = 64) -> float:
    """Mean next-token loss over every token of held-out text-only conversations."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = processor.pad_batch([(e.input_ids, e.input_ids) for e in chunk], [[] for _ in chunk])
        batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        out = model(**batch, num_items_in_batch=1)  # the summed loss; divided once at the end
        total += float(out.loss)
        count += out.num_tokens
    return total / count


def evaluate(model: MultimodalLM, processor: Processor, data: str | Path, text_data: str | Path | None = None,
             batch_size: int = 64, limit: int | None = None, strict: bool = False,
             max_new_tokens: int = 48, text_data_optional: bool = False) -> tuple[dict, list[dict]]:
    """Metrics and per-record predictions for a data file (and the text LM loss when text_data is given). The
    metrics' "records" (and "text_records") give the file's kept and skipped records, by reason and id.
    limit: the file's first `limit` records only, a skipped one among them counted; max_new_tokens: longer answers
    are cut there and scored as cut. text_data_optional: text_data was found, not asked for, so a file that cannot
    give the loss (no usable record, or under strict a bad one) is a warning and the loss is left out, not an
    error; "text_records" then says why."""
    for name, value in ("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens):
        if value is not None and (not is_integer(value) or value < 1):
            raise ConfigError(f"{name}={value!r}: expected an integer >= 1" + (", or None for every record"
                                                                              if name == "limit" else ""))
    prompts: dict[int, tuple] = {}  # each kept record's prompt, encoded once: checked, then answered
    room = partial(_check_prompt_leaves_room, processor, model.config.text.max_position_embeddings, max_new_tokens,
                   prompts)
    examples, report = load_examples(data, processor, strict=strict, limit=limit, check=room)
    if report.skipped:
        print(report.summary())
    if not examples:  # scores of nothing would print as dashes and pass for an evaluation
        raise DataError(f"{data}: no usable record to evaluate ({report.skipped} skipped); expected records with a "
                        f"question and its reference answer")
    text_examples, text_records = None, None
    if text_data is not None:  # read before answering, so that an unusable file fails at once
        try:
            text_examples, text_report = _held_out_text(text_data, processor, strict)
            text_records = text_report.as_json()
        except DataError as e:
            if not text_data_optional:
                raise
            print(f"warning: {e}; the held-out text loss is left out (this file was found beside the data, not named "
                  f"as the held-out text)", file=sys.stderr)
            held = getattr(e, "report", None)
            text_records = {**(held.as_json() if held else {"file": str(text_data)}), "left_out": str(e)}
    model.eval()
    answers = answer_all(model, processor, examples, batch_size, max_new_tokens, prompts)
    metrics = score_answers(examples, answers) | {"records": report.as_json()}
    if text_examples is not None:
        metrics["text_loss"] = text_lm_loss(model, processor, text_examples, batch_size)
    if text_records is not None:
        metrics["text_records"] = text_records
    predictions = [{"id": e.example.id, "type": e.example.type, "image": str(e.example.images[0]) if e.example.images else None,
                    "question": e.example.messages[_first_answer(e) - 1]["content"].replace(IMAGE, "").strip(),
                    "prediction": a, "reference": e.example.messages[_first_answer(e)]["content"]}
                   for e, a in zip(examples, answers)]
    return metrics, predictions
