"""Reading training/evaluation data: LLaVA conversation JSON and Hugging Face `messages` JSONL.

Every record is checked before it can reach the model. By default a bad record is skipped and counted by reason
(a summary is printed at the end); with strict=True the first one stops the run with file, record id and reason.
The check that matters most is the one LLaVA users meet as a mysteriously low loss: an answer that tokenises to
nothing or is cut off by the length limit leaves every label at -100 and would train on nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.errors import DataError, ImageTooLargeError
from tessera.processor import IGNORE_INDEX, Processor, join_parts
from tessera.text.tokenizer import IMAGE

LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    id: str
    messages: list[dict[str, Any]]  # {"role", "content": str with <image> placeholders}
    images: list[Path]
    type: str | None = None  # task kind, when the file says (caption, colour, …)


@dataclass
class EncodedExample:
    example: Example
    input_ids: list[int]
    labels: list[int]
    pixel_values: list[torch.Tensor]


@dataclass
class SkipReport:
    """Records skipped, by reason, with the ids of each (the summary shows the first few)."""

    source: str
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, record_id: str, reason: str) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, []).append(record_id)

    def as_json(self) -> dict:
        """The file's records for a metrics JSON: a score over 13 records of 30 must not pass for one over 30."""
        return {"file": self.source, "kept": self.kept, "skipped": self.skipped,
                "skipped_by_reason": dict(self.reasons.most_common()), "skipped_ids": self.examples}

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    @property
    def reasons_line(self) -> str:
        """'3 missing image, 1 no answer': the skip reasons on one line, most common first ('' for none)."""
        return ", ".join(f"{count} {reason}" for reason, count in self.reasons.most_common())

    def summary(self) -> str:
        lines = [f"{self.source}: {self.kept} records kept, {self.skipped} skipped"]
        for reason, count in self.reasons.most_common():
            lines.append(f"  {count:6d}  {reason}  (e.g. {', '.join(self.examples[reason][:3])})")
        return "\n".join(lines)


class RecordError(DataError):
    """One record cannot be used; `reason` is the short label it is counted under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason, self.detail = reason, detail


JSONL_SUFFIXES = (".jsonl", ".ndjson")


def _one_record_per_line(text: str) -> bool:
    lines = [line for line in text.split("\n") if line.strip()]
    try:
        return len(lines) > 1 and isinstance(json.loads(lines[0]), dict)
    except json.JSONDecodeError:
        return False


def read_raw_records(path: str | Path) -> list[tuple[str, str, Any]]:
    """(record id, label, raw record) triples from a LLaVA .json list or a messages .jsonl (or .ndjson) file (bad JSON
    lines come back as RecordErrors to be skipped like any other bad record). The label names the record in messages:
    a JSONL record's adds its line number, as ids are often shared by many lines; a JSON record's, its place in the
    list (#0 for the first) when its id is shared or missing."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory; expected a data file in it (a LLaVA .json list or a messages .jsonl, "
                        f"such as {path / 'test.json'})")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text ({e.reason}, byte {e.start}); expected a UTF-8 "
                        f"JSON or JSONL file") from None
    text = text.removeprefix("\ufeff")  # the byte-order mark Windows editors write, which json.loads refuses
    if path.suffix.lower() in JSONL_SUFFIXES:  # DATA.JSONL too
        pairs = []
        # only "\n" ends a JSONL line: str.splitlines would also split at U+2028, U+0085, … that JSON strings may
        # hold raw, cutting a record in two invalid halves
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                pairs.append((f"line {number}", f"line {number}", RecordError("invalid JSON", str(e))))
                continue
            record_id = record.get("id") if isinstance(record, dict) else None
            if record_id is None:
                pairs.append((f"line {number}", f"line {number}", record))
            else:
                pairs.append((str(record_id), f"{record_id} (line {number})", record))
        return pairs
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        if _one_record_per_line(text):  # JSONL under another name (.json, .txt): read by its name, it is one error
            raise DataError(f"{path}: one JSON record per line (JSONL), read as one JSON document by its name; "
                            f"expected a name ending in .jsonl for messages records") from None
        raise DataError(f"{path}: not valid JSON ({e}); expected a list of LLaVA conversation records") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    # a record without an id (or with "id": null) is named by its place in the list, #0 for the first
    ids = [str(r["id"]) if isinstance(r, dict) and r.get("id") is not None else f"#{i}" for i, r in enumerate(records)]
    counts = Counter(ids)  # an id many records share names none of them: their places do
    return [(record_id, record_id if counts[record_id] == 1 else f"{record_id} (#{i})", r)
            for i, (record_id, r) in enumerate(zip(ids, records))]


def parse_record(record: Any, record_id: str, image_root: Path) -> Example:
    """A raw LLaVA or messages record → Example, with the structural checks (roles, order, placeholders)."""
    if isinstance(record, RecordError):
        raise record
    if not isinstance(record, dict):
        raise RecordError("not an object", f"got {type(record).__name__}")
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise RecordError("malformed turns", f"'conversations' must be a list, got {turns!r}")
        messages = []
        for index, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in LLAVA_ROLES or not isinstance(turn.get("value"), str):
                raise RecordError("malformed turns", f"turn {index}: expected {{'from': human|gpt|system, 'value': "
                                                     f"str}}, got {turn!r}")
            messages.append({"role": LLAVA_ROLES[turn["from"]], "content": turn["value"]})
        images = _image_paths(record, "image")
    elif "messages" in record:
        if not isinstance(record["messages"], list):
            raise RecordError("malformed turns", f"'messages' must be a list, got {record['messages']!r}")
        messages = []
        for index, message in enumerate(record["messages"]):
            if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
                raise RecordError("malformed turns", f"message {index}: expected {{'role': system|user|assistant, "
                                                     f"…}}, got {message!r}")
            try:
                messages.append({"role": message["role"], "content": _content_text(message.get("content"))})
            except RecordError as e:
                raise RecordError(e.reason, f"message {index}: {e.detail}") from None
        images = _image_paths(record, "images")
    else:
        raise RecordError("no conversation", "expected 'conversations' (LLaVA) or 'messages'")
    if not isinstance(record.get("type") or "", str):  # null, like a missing type, marks a question
        raise RecordError("malformed type", f"'type' must be a string (\"caption\" marks a caption), got "
                                            f"{record['type']!r}")
    _check_turns(messages)
    placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if placeholders != len(images):
        raise RecordError("placeholder count ≠ image count",
                          f"{placeholders} <image> placeholder(s) for {len(images)} image(s)")
    return Example(record_id, messages, [image_root / p for p in images], record.get("type"))


def _image_paths(record: dict, key: str) -> list[str]:
    """The record's image paths: one path, or a list of them."""
    images = record.get(key)
    if images is None or images == "":  # LLaVA files write a text-only record's image either way
        return []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise RecordError("malformed images", f"{key!r} must be a path or a list of paths, got {record[key]!r}")
    return images


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, dict) and part.get("type") == "image":
                parts.append(IMAGE)
            else:
                raise RecordError("malformed turns", f"unknown content part {part!r}")
        return join_parts(parts)
    raise RecordError("malformed turns", f"content must be a string or a list of parts, got {content!r}")


def _check_turns(messages: list[dict]) -> None:
    if not messages:
        raise RecordError("empty conversation")
    body = messages[1:] if messages[0]["role"] == "system" else messages
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise RecordError("mis-ordered turns", f"turn {i} is {message['role']!r}; expected {expected!r} "
                                                   f"(user and assistant alternate, user first)")
        if not message["content"].strip() or message["content"].strip() == IMAGE and expected == "assistant":
            raise RecordError("empty turn", f"turn {i} ({message['role']}) has no text")
        if expected == "assistant" and IMAGE in message["content"]:  # its image tokens would become targets
            raise RecordError("image placeholder in an answer", f"turn {i} (assistant) holds {IMAGE}; images go "
                                                                f"in user turns")
    if not body or body[-1]["role"] != "assistant":
        raise RecordError("no answer", "the conversation must end with an assistant turn")


def load_examples(path: str | Path, processor: Processor, image_root: str | Path | None = None,
                  strict: bool = False, image_cache: dict | None = None, text_only: bool = False,
                  limit: int | None = None, check: Callable[[EncodedExample], None] | None = None
                  ) -> tuple[list[EncodedExample], SkipReport]:
    """Read, check, tokenise and preprocess every record of a data file.

    Images are loaded once per path (several records often share one); image_cache may be shared between files.
    text_only: records with images are bad records (language-model pretraining and the held-out text loss label
    every token and pass no images). limit: the file's first `limit` records only, skipped ones among them; the
    rest are neither checked nor decoded. check: a caller's own test of an encoded record, raising RecordError for
    a bad one (evaluation: does the prompt leave room for the answer?).
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    report = SkipReport(str(path))
    cache = {} if image_cache is None else image_cache
    kept = []
    for record_id, label, raw in read_raw_records(path)[:limit]:
        try:
            example = parse_record(raw, record_id, root)
            if text_only and example.images:
                raise RecordError("image in a text-only file", f"{len(example.images)} image(s)")
            pixels = [_image(cache, image, processor) for image in example.images]
            ids, labels = _encode(processor, example)
            encoded = EncodedExample(example, ids, labels, pixels)
            if check is not None:
                check(encoded)
        except RecordError as e:
            if strict:
                raise DataError(f"{path}: record {label}: {e}") from None
            report.skip(label, e.reason)
            continue
        kept.append(encoded)
    report.kept = len(kept)
    return kept, report


def _image(cache: dict, path: Path, processor: Processor) -> torch.Tensor:
    if path not in cache:
        if not path.is_file():
            cache[path] = RecordError("missing image", str(path))
        else:
            try:
                cache[path] = processor.preprocess_image(path)
            except ImageTooLargeError as e:
                cache[path] = RecordError("image too large", str(e))
            except DataError as e:
                cache[path] = RecordError("unreadable image", str(e))
    value = cache[path]
    if isinstance(value, RecordError):
        raise value
    return value


def in_model_placeholders(processor: Processor, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A record's messages with its `<image>` placeholders written as the model's image token (an imported Llama
    3.2 Vision's is `<|image|>`: the template wrote `<image>` as the text it is, and no image had a place)."""
    token = processor.image_token
    if token == IMAGE:
        return messages
    return [{**m, "content": m["content"].replace(IMAGE, token)} for m in messages]


def _encode(processor: Processor, example: Example) -> tuple[list[int], list[int]]:
    try:
        ids, labels, _ = processor.encode(in_model_placeholders(processor, example.messages))
    except DataError as e:  # an imported chat template refusing the conversation, or rewriting a typed token
        raise RecordError("refused by the chat template", str(e)) from None
    answers = [m for m in example.messages if m["role"] == "assistant"]
    for answer in answers:
        if not processor.tokenizer.encode(answer["content"], add_special_tokens=False).ids:
            raise RecordError("answer tokenises to nothing", repr(answer["content"]))
    try:
        ids, labels = processor.truncate(ids, labels)
    except DataError as e:
        raise RecordError("image cut by the length limit", str(e)) from None
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise RecordError("answer cut off by the length limit",
                          f"{len(ids)} tokens kept of a longer conversation; no answer token left to learn from")
    return ids, labels
