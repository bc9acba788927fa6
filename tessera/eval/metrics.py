"""Answer metrics: exact match after normalisation (VQA-style) and caption scores (CIDEr, BLEU-4) from the
pycocoevalcap scorers — their pure-Python parts only (no Java tokenizer, no downloads)."""

from __future__ import annotations

import re
import string

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
# the VQA evaluation's number words: "two" and "2" are the same answer to "how many …?" ("none" too: 0)
NUMBER_WORDS = {word: str(n) for n, word in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))} | {"none": "0"}


def normalize_answer(text: str, keep_articles: bool = False) -> str:
    """Lowercase, punctuation and articles removed, number words as digits, whitespace collapsed:
    "The Red circle." → "red circle", "Two." → "2". keep_articles=True keeps them."""
    text = text.lower().translate(PUNCTUATION)
    if not keep_articles:
        text = ARTICLES.sub(" ", text)
    return " ".join(NUMBER_WORDS.get(word, word) for word in text.split())


def exact_match(prediction: str, reference: str) -> bool:
    ours, theirs = normalize_answer(prediction), normalize_answer(reference)
    if not ours or not theirs:  # an answer that is all articles ("A", a choice's letter): they are its content, or
        # an empty prediction would match it
        return normalize_answer(prediction, keep_articles=True) == normalize_answer(reference, keep_articles=True)
    return ours == theirs


def caption_scores(references: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """CIDEr (the "CIDEr-D" variant coco-caption reports) and BLEU-4 over a corpus of captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if not predictions:
        return {"cider": 0.0, "bleu4": 0.0}
    refs = {k: [_tokens(r) for r in references[k]] for k in predictions}
    preds = {k: [_tokens(v)] for k, v in predictions.items()}
    cider, _ = Cider().compute_score(refs, preds)
    bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3])}


def _tokens(text: str) -> str:
    """coco-caption's PTB tokenisation, approximated: lowercase words without punctuation."""
    return " ".join(text.lower().translate(PUNCTUATION).split())
