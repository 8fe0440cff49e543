"""A look at the data before training: `trainer prepare` writes two pictures next to dataset.json.

  samples.png       a few training images of each class (of the first PREVIEW_CLASSES classes),
                    as stored (decoded and scaled the way the shards hold them)
  class_counts.png  how many images each class has in each split

People look before they train: a class folder full of the wrong pictures, or a class with a
handful of images, shows here at a glance.
"""

import io

import numpy as np
from absl import logging
from PIL import Image

from trainer.formats import imagefiles
from trainer.formats.manifest import CLASS_COUNTS_PICTURE, SAMPLES_PICTURE, SPLITS
from trainer.infra import figures, storage

SAMPLES_PER_CLASS = 6
PREVIEW_CLASSES = 24  # rows of samples.png; the rest are named in its title
THUMBNAIL_SIDE = 128
NAMED_BARS = 60  # class_counts.png names its classes up to this many, then shows the sorted profile


class Samples:
    """The candidates for samples.png, offered the training shards in plan order (the order the
    shards hold): the first 2 x SAMPLES_PER_CLASS files of each shown class, so that a few
    undecodable files still leave a full row."""

    def __init__(self, classes):
        self.found = {name: [] for name in classes[:PREVIEW_CLASSES]}

    def offer(self, files):
        """`files`: `(path, location, label, ...)` of one training shard."""
        for path, location, label, *_ in files:
            kept = self.found.get(label)
            if kept is not None and len(kept) < 2 * SAMPLES_PER_CLASS:
                kept.append((path, location))


def write_preview(output, classes, candidates, manifest, max_pixels=imagefiles.MAX_PIXELS,
                  max_image_bytes=imagefiles.MAX_IMAGE_BYTES):
    """Draws samples.png and class_counts.png into `output`; returns their URLs.

    `candidates`: {class: [(path, location)]}, a `Samples`' `found`."""
    figures.use_fonts()
    skipped = {entry["file"] for entry in manifest["skipped"]}
    pictures = {SAMPLES_PICTURE: _draw_samples(classes, _samples(candidates, skipped, max_pixels, max_image_bytes)),
                CLASS_COUNTS_PICTURE: _draw_counts(manifest)}
    urls = []
    for name, figure in pictures.items():
        urls.append(storage.join(output, name))
        storage.write_bytes(urls[-1], figures.to_png(figure))
    logging.info("a look at the data: %s", ", ".join(urls))
    return urls


def _samples(candidates, skipped, max_pixels, max_image_bytes=imagefiles.MAX_IMAGE_BYTES):
    """{class: [RGB arrays]}: up to SAMPLES_PER_CLASS decoded thumbnails of each class's candidates."""
    found = {name: [] for name in candidates}
    for name, files in candidates.items():
        locations = [location for path, location in files if path not in skipped]
        for data in storage.read_many(locations, max_image_bytes):
            usable = data and not imagefiles.too_large(data, max_image_bytes)
            stored = imagefiles.encode_or_skip(data, max_side=THUMBNAIL_SIDE, max_pixels=max_pixels) if usable else None
            if stored and "skip" not in stored and len(found[name]) < SAMPLES_PER_CLASS:
                found[name].append(np.asarray(Image.open(io.BytesIO(stored["encoded"])).convert("RGB")))
    return found


def _draw_samples(classes, samples):
    rows = min(len(classes), PREVIEW_CLASSES)
    figure, axes = figures.new_figure(1.4 * SAMPLES_PER_CLASS + 1.6, 1.4 * rows + 0.5, columns=SAMPLES_PER_CLASS,
                                      rows=rows)
    axes = np.atleast_2d(axes).reshape(rows, SAMPLES_PER_CLASS)
    names = figures.readable_names(classes[:rows], limit=16)
    for row, name in enumerate(classes[:rows]):
        for column, panel in enumerate(axes[row]):
            panel.set_xticks([])
            panel.set_yticks([])
            for spine in panel.spines.values():
                spine.set_visible(False)
            if column < len(samples[name]):
                panel.imshow(samples[name][column])
            if column == 0:
                panel.set_ylabel(names[row], rotation=0, ha="right", va="center", fontsize=9)
    more = f" (the first {rows} of {len(classes)} classes)" if len(classes) > rows else ""
    figure.suptitle(f"training images of each class{more}")
    return figure


def _draw_counts(manifest):
    classes = manifest["classes"]
    splits = [split for split in SPLITS if split in manifest["splits"]]
    counts = np.array([[manifest["splits"][split]["class_counts"].get(name, 0) for name in classes]
                       for split in splits])
    from matplotlib.ticker import MaxNLocator

    if len(classes) <= NAMED_BARS:
        figure, axes = figures.new_figure(8, max(2.5, 1.2 + 0.28 * len(classes)))
        left = np.zeros(len(classes))
        for split, row in zip(splits, counts, strict=True):
            axes.barh(range(len(classes)), row, left=left, label=split)
            left += row
        axes.set_yticks(range(len(classes)), figures.readable_names(classes))
        axes.invert_yaxis()
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("images")
        axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    else:  # too many names to read: every class's total, largest first
        figure, axes = figures.new_figure(8, 4.5)
        totals = np.sort(counts.sum(axis=0))[::-1]
        axes.bar(range(len(classes)), totals, width=1.0)
        axes.set_xlabel(f"the {len(classes)} classes, largest first")
        axes.set_ylabel("images")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_title(f"images per class: {int(counts.sum())} in {len(classes)} classes")
    return figure
