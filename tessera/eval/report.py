"""Plain terminal tables of evaluation metrics (JSON is for machines; this is for people)."""

from __future__ import annotations

from typing import Any

# CIDEr-D takes its IDF weights from the references being scored: over a handful of captions most n-grams occur in
# all of them, weigh log(1) = 0, and the score means nothing (one perfect caption scores 0)
MIN_CIDER_CAPTIONS = 10


def _number(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def metrics_table(metrics: dict[str, Any], title: str = "evaluation") -> str:
    rows = [title, f"  {'exact match (questions)':<28s} {_number(metrics.get('exact_match')):>8s}"
                   f"   ({_count(metrics.get('questions', 0), 'question')})"]
    for kind, value in metrics.get("exact_match_by_type", {}).items():
        rows.append(f"    {kind:<26s} {_number(value):>8s}")
    if metrics.get("captions"):
        cider, note = _number(metrics.get("cider")), _count(metrics["captions"], "caption")
        if metrics["captions"] < MIN_CIDER_CAPTIONS:
            cider, note = "—", note + f": too few for CIDEr-D, whose IDF comes from them; raw {cider} in the JSON"
        rows.append(f"  {'CIDEr (captions)':<28s} {cider:>8s}   ({note})")
        rows.append(f"  {'BLEU-4 (captions)':<28s} {_number(metrics.get('bleu4')):>8s}")
    if metrics.get("text_loss") is not None:
        rows.append(f"  {'held-out text loss':<28s} {_number(metrics['text_loss'], 4):>8s}")
    elif "left_out" in metrics.get("text_records", {}):  # a missing figure says why
        rows.append(f"  {'held-out text loss':<28s} {_number(None):>8s}   (left out: {metrics['text_records']['file']} "
                    f"cannot be used; see the JSON)")
    if metrics.get("text_loss_before") is not None:
        rows.append(f"  {'held-out text loss':<28s} {_number(metrics['text_loss_before'], 4):>8s} before → "
                    f"{_number(metrics.get('text_loss_after'), 4)} after the multimodal stages")
    records = metrics.get("records")
    if records and records["skipped"]:  # a score over part of the file says so beside it
        rows.append(f"  {'records skipped':<28s} {records['skipped']:>8d}   (of {records['kept'] + records['skipped']}; "
                    f"by reason and id in the JSON)")
    if metrics.get("wall_seconds") is not None:
        rows.append(f"  {'wall time':<28s} {metrics['wall_seconds']:>7.0f}s")
    return "\n".join(rows)
