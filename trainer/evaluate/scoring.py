"""Scoring a split: every batch through a model's `predict_images` signature (and the same
pixels through production's model when it is compared), counted against the manifest, with the
most confident mistakes kept for their picture."""

import math
import sys

import numpy as np
from tqdm import tqdm

from trainer.errors import UserError


def score(predict_images, dataset, expected_examples, batch_size=None, others=(), mistakes=None):
    """Runs a model's `predict_images` over every batch of a dataset (and the same batches through
    the `others`: the production model the candidate is compared with sees the very same pixels).

    Args:
      predict_images: callable taking `images=` float32 [B, S, S, 3] and returning a dict with
        "probabilities" [B, C] (an exported model's signature).
      dataset: yields (images, labels) batches.
      expected_examples: how many examples the dataset must yield (the manifest's count).
      batch_size: for the progress bar's total only.
      others: more signatures like `predict_images`.
      mistakes: a `pictures.ConfidentMistakes` to feed with every batch.

    Returns:
      (labels [N] int64, probabilities [N, C] float32) as numpy arrays; with `others`, a third
      item: the list of their probabilities.

    Raises:
      UserError: the dataset yielded a different number of examples than expected (shards that do
        not match their manifest); an evaluation never silently scores a part of a split.
    """
    total = math.ceil(expected_examples / batch_size) if batch_size else None
    labels, probabilities, other_probabilities = [], [], [[] for _ in others]
    for images, batch_labels in tqdm(dataset, total=total, unit="batch", desc="evaluating",
                                     file=sys.stderr, mininterval=2.0):
        probabilities.append(np.asarray(predict_images(images=images)["probabilities"]))
        if mistakes is not None:
            mistakes.add(images, batch_labels, probabilities[-1])
        for function, collected in zip(others, other_probabilities, strict=True):
            collected.append(np.asarray(function(images=images)["probabilities"]))
        labels.append(np.asarray(batch_labels))
    scored = sum(len(batch) for batch in labels)
    if scored != expected_examples:
        raise UserError(f"scored {scored} examples but the manifest lists {expected_examples} for this "
                        "split: the shards do not match dataset.json (re-run `trainer prepare`)")
    result = np.concatenate(labels).astype(np.int64), np.concatenate(probabilities)
    if others:
        return (*result, [np.concatenate(collected) for collected in other_probabilities])
    return result


MISTAKES_SHOWN = 16


class ConfidentMistakes:
    """Keeps the `limit` most confident wrong predictions seen, with their pixels (a thumbnail).

    Fed batch by batch while scoring (`evaluate.score`), so the pixels shown are the ones the model
    saw, and nothing but these few images is kept.
    """

    def __init__(self, limit=MISTAKES_SHOWN):
        self.limit, self.kept, self.seen = limit, [], 0

    def add(self, images, labels, probabilities):
        labels, probabilities = np.asarray(labels), np.asarray(probabilities)
        predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
        for index in np.flatnonzero(predicted != labels):
            self.kept.append({"index": self.seen + int(index), "label": int(labels[index]),
                              "predicted": int(predicted[index]), "confidence": float(confidence[index]),
                              "image": np.clip(np.asarray(images[index]), 0, 255).astype(np.uint8)})
        self.kept = sorted(self.kept, key=lambda mistake: -mistake["confidence"])[:self.limit]
        self.seen += len(labels)
