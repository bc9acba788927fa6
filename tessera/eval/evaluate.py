"""Evaluation: generate an answer for every record and score it — exact match per question type, CIDEr/BLEU-4
for captions — plus the text-only LM loss on held-out text (the article's "does the LLM keep its text skills")."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch

from tessera.config import is_integer
from tessera.data.records import EncodedExample, load_examples
from tessera.errors import ConfigError, DataError
from tessera.eval.metrics import caption_scores, exact_match
from tessera.model import MultimodalLM
from tessera.processor import IGNORE_INDEX, Processor
from tessera.text.tokenizer import IMAGE


def answer_all(model: MultimodalLM, processor: Processor, examples: list[EncodedExample], batch_size: int = 64,
               max_new_tokens: int = 48) -> list[str]:
    """Greedy answers to each example's first user turn (its reference answer is left out of the prompt)."""
    answers = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        rows, images = [], []
        for e in chunk:
            prompt = e.example.messages[:_first_answer(e)]
            ids, labels, _ = processor.encode(prompt, add_generation_prompt=True)
            rows.append((ids, labels))
            # a multi-turn record's later turns may hold images too: only the prompt's go in, in order
            images.append(e.pixel_values[:sum(m["content"].count(IMAGE) for m in prompt)])
        batch = processor.pad_batch(rows, images, padding_side="left")
        batch.pop("labels")
        result = model.generate(**batch, max_new_tokens=max_new_tokens, tokenizer=processor)
        answers += result.texts
    return answers


def _first_answer(encoded: EncodedExample) -> int:
    return next(i for i, m in enumerate(encoded.example.messages) if m["role"] == "assistant")


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
             max_new_tokens: int = 48) -> tuple[dict, list[dict]]:
    """Metrics and per-record predictions for a data file (and the text LM loss when text_data is given).
    limit: the first `limit` records only; max_new_tokens: longer answers are cut there and scored as cut."""
    for name, value in ("limit", limit), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens):
        if value is not None and (not is_integer(value) or value < 1):
            raise ConfigError(f"{name}={value!r}: expected an integer >= 1" + (", or None for every record"
                                                                              if name == "limit" else ""))
    examples, report = load_examples(data, processor, strict=strict)
    if report.skipped:
        print(report.summary())
    if not examples:  # scores of nothing would print as dashes and pass for an evaluation
        raise DataError(f"{data}: no usable record to evaluate ({report.skipped} skipped); expected records with a "
                        f"question and its reference answer")
    text_examples = None
    if text_data is not None:  # read before answering, so that an unusable file fails at once
        text_examples, text_report = load_examples(text_data, processor, strict=strict, text_only=True)
        if text_report.skipped:
            print(text_report.summary())
        if not text_examples:  # a loss over no tokens would be 0/0
            raise DataError(f"{text_data}: no usable held-out text records ({text_report.skipped} skipped); expected "
                            f"text-only conversations ending with an assistant turn")
    examples = examples[:limit] if limit else examples
    model.eval()
    answers = answer_all(model, processor, examples, batch_size, max_new_tokens)
    metrics = score_answers(examples, answers)
    if text_examples is not None:
        metrics["text_loss"] = text_lm_loss(model, processor, text_examples, batch_size)
    predictions = [{"id": e.example.id, "type": e.example.type, "image": str(e.example.images[0]) if e.example.images else None,
                    "question": e.example.messages[_first_answer(e) - 1]["content"].replace(IMAGE, "").strip(),
                    "prediction": a, "reference": e.example.messages[_first_answer(e)]["content"]}
                   for e, a in zip(examples, answers)]
    return metrics, predictions
