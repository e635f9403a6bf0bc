"""What a loaded run does with a user's inputs, whatever runs the model: check them, turn them into model inputs, and
turn class probabilities into labelled predictions.

Shared by the PyTorch run (`peftlab.load`) and its ONNX export (`peftlab.exported.load_onnx`), so both accept and
refuse the same inputs and encode them identically (same tokenizer call, same eval image transform).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image

from peftlab.data.image import IMAGE_SUFFIXES, open_image_file
from peftlab.data.ordering import longest_first, put_back
from peftlab.errors import PeftlabError


@dataclass
class Preprocessing:
    """Texts -> tokenizer outputs, or image paths / PIL images -> `pixel_values`, with one-line errors for inputs of
    the wrong kind."""

    task: str
    """"text" or "image"."""
    source: Path
    """The run (or export) folder, named in error messages."""
    tokenizer: Any = None
    """Text only: the run's tokenizer."""
    max_length: Optional[int] = None
    """Text only: texts are truncated to this many tokens, as in training."""
    transform: Optional[Callable[[Image.Image], torch.Tensor]] = None
    """Image only: the eval transform (resize and normalise, `peftlab.data.transforms.build_image_transform`)."""

    def __call__(self, inputs: list) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for a batch: padded token tensors, or stacked normalised images."""
        if self.task == "text":
            for text in inputs:
                self.check_text(text)
            return dict(self.tokenizer(inputs, truncation=True, max_length=self.max_length, padding=True,
                                       return_tensors="pt"))
        images = [self.open_image(x) if isinstance(x, (str, Path)) else x for x in inputs]
        return {"pixel_values": torch.stack([self.transform(image) for image in images])}

    def check_text(self, text) -> None:
        """Error for an input a text run cannot label: not a string, or what looks like an image file's path."""
        if not isinstance(text, str):
            raise PeftlabError(f"{text!r} is not a text; run {self.source} labels texts")
        if Path(text).suffix.lower() in IMAGE_SUFFIXES and not any(char.isspace() for char in text):
            raise PeftlabError(f"{text!r} looks like an image file, but run {self.source} labels texts; pass texts, "
                               f"or the folder of an image run")

    def open_image(self, path: str | Path) -> Image.Image:
        """The decoded image at `path`; one-line errors for text given to an image run and for unreadable files."""
        if not Path(path).is_file():
            raise PeftlabError(f"{str(path)!r} is not an image file, and run {self.source} labels images; pass "
                               f"paths of existing image files")
        return open_image_file(path)


def probabilities_in_batches(probabilities: Callable[[list], torch.Tensor], inputs: list, num_labels: int,
                             batch_size: int = 64, progress: bool = False,
                             lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """`probabilities(inputs)` computed `batch_size` inputs at a time, (N, num_labels) in the order of `inputs`, with a
    progress bar on stderr when `progress` and there is more than one batch.

    Texts are batched longest first (peftlab.data.ordering), so each batch pads to about its own length. Their
    length here is in characters, not tokens: an ensemble's members tokenize differently, and the order only
    decides which texts share a batch, not what the model says about each.

    Args:
        probabilities: `inputs -> (N, num_labels)` class probabilities (a run's `.probabilities`).
        lengths: each input's length to order by, for inputs that are not plain texts (a multi-task run's
            (text, task) pairs); default: the characters of text inputs, and input order for anything else.
    """
    from tqdm.auto import tqdm

    if lengths is None and all(isinstance(item, str) for item in inputs):
        lengths = [len(item) for item in inputs]
    order = longest_first(lengths) if lengths is not None else list(range(len(inputs)))
    starts = range(0, len(inputs), batch_size)
    chunks = [probabilities([inputs[index] for index in order[start:start + batch_size]])
              for start in tqdm(starts, desc="predict", unit="batch", disable=not progress or len(starts) < 2)]
    return put_back(torch.cat(chunks), order) if chunks else torch.empty(0, num_labels)


def label_predictions(probabilities: Callable[[list], torch.Tensor], label_names: list[str], inputs: list,
                      batch_size: int = 64, progress: bool = False) -> list[dict]:
    """One {"input", "label", "score", "probabilities": {label name: probability}} dict per input, labelled in
    batches of `batch_size` (see `probabilities_in_batches`).

    Args:
        probabilities: `inputs -> (N, num_labels)` class probabilities (a run's `.probabilities`).
    """
    rows = probabilities_in_batches(probabilities, inputs, len(label_names), batch_size, progress).tolist()
    return [labelled(item, row, label_names) for item, row in zip(inputs, rows)]


def labelled(item, row: list[float], label_names: list[str], **after_input) -> dict:
    """The {"input", "label", "score", "probabilities"} dict of one input from its class probabilities (`row`, one
    per label name; extra columns past them are ignored), with `after_input`'s keys after "input" (a task)."""
    row = row[:len(label_names)]
    best = max(range(len(row)), key=row.__getitem__)
    return {"input": str(item), **after_input, "label": label_names[best], "score": round(row[best], 4),
            "probabilities": {name: round(p, 6) for name, p in zip(label_names, row)}}
