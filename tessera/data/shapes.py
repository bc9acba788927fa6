"""The built-in shapes world: small scenes of coloured shapes on a 3×3 grid, drawn with PIL, with captions and
questions whose answers are read off the scene — a dataset that needs no download and that a tiny model can
learn on a CPU in minutes.

    tessera data shapes --out data/shapes --train 3000 --test 300 --seed 0

Writes DIR/images/*.png, DIR/train.json and DIR/test.json (LLaVA conversation format with a `type` field), and
DIR/text_train.jsonl / DIR/text_test.jsonl: the same tasks about scenes described in words, in Hugging Face
`messages` format, for text-only LM pretraining.

Training records are what LLaVA-Instruct looks like: per image, one caption record and one multi-turn record with
one question of each kind about that image (type "questions", in shuffled order), so the image is read once for
several answers; `all_questions` asks everything the image answers instead (each unique shape's colour and
position, the shape in each occupied cell, and a yes and a no existence question) — more supervision per image,
longer steps. Test records hold one task each, typed by question kind, so exact match can be reported per kind.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tessera.data.records import JSONL_SUFFIXES
from tessera.errors import ConfigError

COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 94, 220), "yellow": (235, 200, 20),
    "purple": (148, 73, 189), "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "exists", "position")
TASK_TYPES = ("caption",) + QUESTION_TYPES


@dataclass(frozen=True, order=True)
class Shape:
    cell: int  # 0..8, row-major on the 3×3 grid
    shape: str
    colour: str
    size: str

    def phrase(self) -> str:
        words = f"{'small ' if self.size == 'small' else ''}{self.colour} {self.shape}"  # large is unmarked
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]  # sorted by cell: reading order
    background: tuple[int, int, int]
    texture: str  # "plain", "noise" or "stripes"

    @property
    def key(self) -> tuple:
        """What the questions can tell apart: two scenes with the same key are the same scene."""
        return tuple((s.cell, s.shape, s.colour, s.size) for s in self.shapes)


def caption(scene: Scene) -> str:
    """"a red circle at the top left and a small blue square in the center"."""
    parts = [f"{s.phrase()} {'in the' if s.position == 'center' else 'at the'} {s.position}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def random_scene(rng: random.Random) -> Scene:
    count = rng.randint(1, 4)
    cells = sorted(rng.sample(range(9), count))
    shapes = tuple(Shape(c, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES)) for c in cells)
    light = rng.randint(215, 250)
    tint = tuple(min(255, light + rng.randint(-8, 8)) for _ in range(3))
    return Scene(shapes, tint, rng.choice(("plain", "noise", "stripes")))


def draw(scene: Scene, size: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    if scene.texture == "noise":
        noise = np.random.default_rng(seed).integers(-10, 11, (size, size, 1))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
    pen = ImageDraw.Draw(image)
    if scene.texture == "stripes":
        shade = tuple(max(0, c - 14) for c in scene.background)
        for x in range(0, size, max(4, size // 12)):
            pen.line([(x, 0), (x, size)], fill=shade, width=1)
    cell = size / 3
    for s in scene.shapes:
        row, col = divmod(s.cell, 3)
        cx, cy = (col + 0.5) * cell, (row + 0.5) * cell
        half = cell * (0.40 if s.size == "large" else 0.22)
        box = [cx - half, cy - half, cx + half, cy + half]
        colour = COLOURS[s.colour]
        if s.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif s.shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return image


def questions(scene: Scene, rng: random.Random, every: bool = False) -> list[tuple[str, str, str]]:
    """(type, question, answer) of every kind the scene answers unambiguously: one per kind, or with `every` all
    of them — each unique shape's colour and position, the shape in each occupied cell, and one yes and one no
    existence question (a training image read once teaches every fact in it)."""
    def some(items: list) -> list:
        return list(items) if every else [rng.choice(items)]

    found = []
    by_shape = {}
    for s in scene.shapes:
        by_shape.setdefault(s.shape, []).append(s)
    unique_shapes = [group[0] for group in by_shape.values() if len(group) == 1]
    if unique_shapes:
        found += [("colour", f"What colour is the {s.shape}?", s.colour) for s in some(unique_shapes)]
    found += [("shape", f"What shape is at the {s.position}?", s.shape) for s in some(scene.shapes)]
    found.append(("count", "How many shapes are there?", NUMBERS[len(scene.shapes)]))
    present = {(s.colour, s.shape) for s in scene.shapes}
    absent = [(c, k) for c in COLOURS for k in SHAPES if (c, k) not in present]
    if every:
        asked = [(rng.choice(sorted(present)), "yes"), (rng.choice(absent), "no")]
    elif rng.random() < 0.5:
        asked = [(rng.choice(sorted(present)), "yes")]
    else:
        asked = [(rng.choice(absent), "no")]
    found += [("exists", f"Is there a {colour} {shape}?", answer) for (colour, shape), answer in asked]
    if unique_shapes:
        found += [("position", f"Where is the {s.shape}?", s.position) for s in some(unique_shapes)]
    return found


CAPTION_PROMPT = "Describe the image."


def _record(record_id: str, image: str, kind: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA record: the image placeholder opens the first human turn."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        conversations += [{"from": "human", "value": f"<image>\n{question}" if i == 0 else question},
                          {"from": "gpt", "value": answer}]
    return {"id": record_id, "image": image, "type": kind, "conversations": conversations}


def _text_record(scene: Scene, turns: list[tuple[str, str]]) -> dict:
    """The same tasks with the scene given in words: what the LLM learns before it ever sees an image."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        prompt = f"Scene: {caption(scene)}.\n{question}" if i == 0 else question
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"type": "text", "messages": messages}


def _new_scene(rng: random.Random, *exclude: set[tuple]) -> Scene:
    while True:
        scene = random_scene(rng)
        if not any(scene.key in keys for keys in exclude):
            return scene


MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 2048


def data_files_in(directory: str | Path) -> list[str]:
    """The dataset files (train and test splits, multimodal and text-only, .json or .jsonl) a directory holds, and
    the images/train_*.png and images/test_*.png that writing the shapes dataset there would replace."""
    directory = Path(directory)
    names = [f"{kind}{split}{suffix}" for kind in ("", "text_") for split in ("train", "test")
             for suffix in (".json", *JSONL_SUFFIXES)]
    held = [name for name in names if (directory / name).is_file()]
    images = sum(1 for pattern in ("train_*.png", "test_*.png") for _ in (directory / "images").glob(pattern))
    return held + ([f"images/train_*.png and test_*.png ({images} files)"] if images else [])


def remove_data_files(directory: str | Path) -> None:
    """Clear the dataset files of `data_files_in` away, so that a directory written over holds one dataset: a
    train.jsonl left beside the new train.json would make training refuse the directory."""
    directory = Path(directory)
    for name in data_files_in(directory):
        if not name.startswith("images/"):  # (the images: make_shapes_dataset replaces them)
            (directory / name).unlink()


def make_shapes_dataset(out: str | Path, train: int = 3000, test: int = 300, seed: int = 0,
                        image_size: int = 48, text_train: int | None = None, text_test: int = 500,
                        all_questions: bool = False) -> dict:
    """Write the dataset; returns a summary. Same arguments → same bytes.

    Each split draws from its own seeded stream. No held-out scene (test images, held-out text) equals a scene
    trained on (train images, training text): a test score must measure reading, not memory; and no held-out
    scene comes twice. The test stream skips the scenes trained on, so the test set does depend on the training
    set: the same seed with another `train` gives other test scenes (compare scores on one dataset). Only 324
    one-shape scenes exist and most are drawn for training, so the test split holds few of them."""
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"image_size={image_size}: expected {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels (a 3×3 grid of "
                          f"shapes: smaller, the small shapes are under 2 pixels across; larger only costs memory "
                          f"and disk)")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for stale in [*(out / "images").glob("train_*.png"), *(out / "images").glob("test_*.png")]:
        stale.unlink()  # a dataset written here before, with more scenes: its images would outlive its records
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    trained: set[tuple] = set()
    held_out: set[tuple] = set()
    for split, count in (("train", train), ("test", test)):
        rng = random.Random(f"{seed}:{split}")
        for index in range(count):
            scene = _new_scene(rng, trained, held_out) if split == "test" else _new_scene(rng)
            (trained if split == "train" else held_out).add(scene.key)
            name = f"{split}_{index:05d}"
            draw(scene, image_size, seed=rng.randrange(2**31)).save(out / "images" / f"{name}.png", optimize=False)
            image = f"images/{name}.png"
            splits[split].append(_record(f"{name}-caption", image, "caption", [(CAPTION_PROMPT, caption(scene))]))
            asked = questions(scene, rng, every=all_questions and split == "train")
            if split == "train":
                rng.shuffle(asked)
                splits[split].append(_record(f"{name}-questions", image, "questions",
                                             [(q, a) for _, q, a in asked]))
            else:
                splits[split] += [_record(f"{name}-{kind}", image, kind, [(q, a)]) for kind, q, a in asked]
    for split, records in splits.items():
        (out / f"{split}.json").write_text(json.dumps(records, indent=1) + "\n")
    text_counts = {"text_train": train if text_train is None else text_train, "text_test": text_test}
    for split, count in text_counts.items():
        rng = random.Random(f"{seed}:{split}")
        lines = []
        for _ in range(count):
            scene = _new_scene(rng, held_out) if split == "text_train" else _new_scene(rng, trained, held_out)
            (trained if split == "text_train" else held_out).add(scene.key)
            turns = [(q, a) for _, q, a in questions(scene, rng)]
            rng.shuffle(turns)
            lines.append(_text_record(scene, [(CAPTION_PROMPT, caption(scene))] + turns))
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {split: len(records) for split, records in splits.items()} | text_counts
