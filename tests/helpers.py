"""What the tests share: running the real command line, asserting its one-line errors, generated
images (the three source layouts, every format, bad files), learnable stripes, tiny training runs,
and datasets written with the product's own writer (trainer.formats).

    from helpers import run_trainer, assert_one_line_error, write_images, prepare_stripes, TINY_JOB
"""

import io
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from trainer import errors
from trainer.infra import storage

# ---------------------------------------------------------------- the command line


# What `trainer prepare` writes besides the shards.
DATASET_FILES = ("dataset.json", "samples.png", "class_counts.png")


def run_trainer(*args, check=False, env=None, timeout=900):
    """Runs the real `trainer` command line in a subprocess; returns the CompletedProcess."""
    command = [sys.executable, "-m", "trainer.cli", *args]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\nstdout:\n{result.stdout}\n"
            f"stderr:\n{result.stderr[-5000:]}"
        )
    return result


def assert_one_line_error(result, *fragments, code=errors.EXIT_BAD_INPUT):
    """A finished command failed as documented: exit `code`, no traceback, and a last line on
    stderr that says error and holds every fragment. Returns that line."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "error" in last.lower(), last
    said = [line for line in result.stderr.splitlines() if line.startswith(("error: ", "retryable error: "))]
    assert said in ([], [last]), result.stderr[-3000:]  # one line says what went wrong: the last
    for fragment in fragments:
        assert fragment in last, last
    return last


def assert_fails_as(call, *fragments, code=errors.EXIT_BAD_INPUT):
    """`call()` raises an error that the command line ends with exit `code` and one line holding
    every fragment (`errors.exit_status`, what `trainer` itself does with it). Returns the line.

    For input errors checked in-process: the subprocess would add only the interpreter's start.
    """
    try:
        call()
    except Exception as error:  # noqa: BLE001 - any error: its exit status is the question
        status, message = errors.exit_status(error)
        if status == errors.EXIT_SOFTWARE:
            raise
    else:
        raise AssertionError("no error was raised")
    assert (status, "\n" in message) == (code, False), (status, message)
    for fragment in fragments:
        assert fragment in message, message
    return message


def train_config(*args):
    """The TrainConfig that `trainer train ARGS` runs: the real flag definitions, parsed in-process."""
    from absl import flags

    from trainer import config

    values = flags.FlagValues()
    config.define_flags(values)
    try:
        values(["trainer train", *args])
    except flags.Error as error:  # as the command line reports it (trainer.cli._parse_flags): exit 1
        raise errors.UserError(str(error)) from None
    return config.with_launcher_defaults(config.TrainConfig.from_flags(values), os.environ)


def train_in_process(*args):
    """Runs `trainer train ARGS` in this process (TensorFlow is loaded already: seconds saved per
    run). For what needs its own process (CPU replicas, signals, a limited disk) use run_trainer."""
    from trainer.train import run

    run.run(train_config(*args))


# ---------------------------------------------------------------- generated images

LAYOUTS = ("class_dirs", "split_dirs", "filename_prefix")
# fmt -> (file extension, what the file holds)
FORMATS = {
    "jpeg": ("jpg", "RGB JPEG"),
    "png": ("png", "RGB PNG"),
    "grey": ("jpg", "greyscale (L) JPEG"),
    "grey_png": ("png", "greyscale (L) PNG"),
    "cmyk": ("jpg", "CMYK JPEG"),
    "rgba": ("png", "RGBA PNG with a varying alpha"),
    "palette": ("png", "palette (P) PNG"),
    "png16": ("png", "16-bit greyscale PNG"),
    "bmp": ("bmp", "RGB BMP"),
    "gif": ("gif", "palette GIF"),
    "webp": ("webp", "RGB WebP (lossless)"),
}
# kind -> (file extension, what the file holds); every one of them must be skipped by `prepare`.
BAD_KINDS = {
    "truncated_jpeg": ("jpg", "a JPEG cut in half"),
    "truncated_png": ("png", "a PNG cut in half"),
    "corrupt_png": ("png", "a PNG whose compressed pixel data has flipped bytes"),
    "not_image": ("jpg", "text with an image extension"),
    "empty": ("jpg", "zero bytes"),
}
COLOURS = [(200, 40, 40), (40, 60, 200), (40, 170, 60), (220, 180, 30), (150, 50, 170), (30, 170, 170)]
DEFAULT_SPLIT_FOLDERS = ("train", "validation", "test")


def make_image(class_index=0, size=(40, 30), seed=0):
    """An RGB Pillow image of `size` (width, height) whose look depends on its class.

    Args:
      class_index: class k gets colour COLOURS[k % 6], horizontal stripes if k is even, else vertical.
      size: (width, height) in pixels.
      seed: per-image noise, so no two images are identical.
    """
    width, height = size
    rng = np.random.default_rng([class_index, seed])
    rows, columns = np.mgrid[0:height, 0:width]
    stripes = ((rows if class_index % 2 == 0 else columns) // 4) % 2
    colour = np.array(COLOURS[class_index % len(COLOURS)], dtype=np.float64)
    pixels = colour * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_image(image, fmt="jpeg"):
    """Encodes an RGB Pillow image as one of FORMATS; returns the bytes."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, "JPEG", quality=90)
    elif fmt == "png":
        image.save(buffer, "PNG")
    elif fmt == "grey":
        image.convert("L").save(buffer, "JPEG", quality=90)
    elif fmt == "grey_png":
        image.convert("L").save(buffer, "PNG")
    elif fmt == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=90)
    elif fmt == "rgba":
        rgba = image.convert("RGBA")
        alpha = np.linspace(60, 255, image.size[0] * image.size[1]).reshape(image.size[::-1])
        rgba.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
        rgba.save(buffer, "PNG")
    elif fmt == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, "PNG")
    elif fmt == "png16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(grey).save(buffer, "PNG")  # uint16 -> mode I;16
    elif fmt == "bmp":
        image.save(buffer, "BMP")
    elif fmt == "gif":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, "GIF")
    elif fmt == "webp":
        image.save(buffer, "WEBP", lossless=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}; one of {', '.join(FORMATS)}")
    return buffer.getvalue()


def image_bytes(fmt="jpeg", class_index=0, size=(40, 30), seed=0):
    """`make_image` encoded as `fmt` (see FORMATS)."""
    return encode_image(make_image(class_index, size, seed), fmt)


def bad_bytes(kind):
    """The bytes of a file `prepare` must skip (see BAD_KINDS)."""
    if kind == "truncated_jpeg":
        data = image_bytes("jpeg", size=(64, 48))
        return data[: len(data) // 2]
    if kind == "truncated_png":
        data = image_bytes("png", size=(64, 48))
        return data[: len(data) // 2]
    if kind == "corrupt_png":
        data = image_bytes("png", size=(64, 48))
        start = data.index(b"IDAT") + 20  # inside the compressed pixels; the header stays valid
        return data[:start] + bytes(byte ^ 0xFF for byte in data[start:start + 60]) + data[start + 60:]
    if kind == "not_image":
        return b"these are notes about the photos, not a photo\n"
    if kind == "empty":
        return b""
    raise ValueError(f"unknown bad file kind {kind!r}; one of {', '.join(BAD_KINDS)}")


def write_file(root, relative, data):
    """Writes `data` to `root/relative` (`relative` uses `/`); returns `relative`."""
    storage.write_bytes(storage.join(root, *relative.split("/")), data)
    return relative


def image_path(layout, class_name, index, fmt="jpeg", split="train"):
    """The relative path `write_images` uses for one image."""
    extension = FORMATS[fmt][0]
    if layout == "class_dirs":
        return f"{class_name}/{class_name}_{index:04d}.{extension}"
    if layout == "split_dirs":
        return f"{split}/{class_name}/{class_name}_{index:04d}.{extension}"
    if layout == "filename_prefix":
        return f"{class_name}.{index:04d}.{extension}"
    raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")


def write_images(root, layout, classes=("cats", "dogs"), per_class=6, size=(40, 30), fmt="jpeg",
                 split_folders=DEFAULT_SPLIT_FOLDERS, start=0):
    """Writes generated images in one of the three source layouts.

    Args:
      root: a local folder or URL (created as needed).
      layout: "class_dirs" (`cats/cats_0000.jpg`), "split_dirs" (`train/cats/cats_0000.jpg`, with
        `per_class` images per class in EACH of `split_folders`) or "filename_prefix"
        (`cats.0000.jpg`: the class is the name before the first dot).
      classes: class names; class k gets make_image's look k.
      per_class: images per class (per class and split folder for split_dirs).
      size: (width, height) of every image.
      fmt: one of FORMATS, or a sequence of them used in turn (image i gets fmt[i % len(fmt)]).
      split_folders: the split folder names for split_dirs (`validation` is the `val` split).
      start: index of the first image, so that a second call adds files next to the first ones.

    Returns:
      The relative paths written (with `/`), in writing order.
    """
    formats = [fmt] if isinstance(fmt, str) else list(fmt)
    folders = split_folders if layout == "split_dirs" else ("train",)
    written = []
    for split_number, split in enumerate(folders):
        for class_index, class_name in enumerate(classes):
            for index in range(start, start + per_class):
                image_format = formats[index % len(formats)]
                relative = image_path(layout, class_name, index, image_format, split)
                data = image_bytes(image_format, class_index, size, seed=index * 7 + split_number)
                written.append(write_file(root, relative, data))
    return written


def write_bad_files(root, folder="", kinds=tuple(BAD_KINDS), name_prefix="bad_"):
    """Writes one file of each bad kind into `root/folder`.

    Args:
      root: a local folder or URL.
      folder: sub-folder (e.g. a class folder "cats", or "train/cats"); "" for the top.
      kinds: which of BAD_KINDS to write.
      name_prefix: start of each file name: "bad_" gives `bad_truncated_jpeg.jpg`; for the
        filename_prefix layout use e.g. "cats.bad_" so the file still names a class.

    Returns:
      The relative paths written (with `/`).
    """
    written = []
    for kind in kinds:
        name = f"{name_prefix}{kind}.{BAD_KINDS[kind][0]}"
        relative = f"{folder.strip('/')}/{name}" if folder else name
        written.append(write_file(root, relative, bad_bytes(kind)))
    return written


# ---------------------------------------------------------------- stripes and tiny training runs

CLASSES = ("horizontal", "vertical")

# A tiny job: the `tiny` backbone at 32 px, random weights. Seconds per epoch on 2 cores.
TINY_JOB = ["--backbone=tiny", "--weights=none", "--image_size=32", "--dense_units=32", "--dropout=0.1"]


def stripes(orientation, rng, size=32):
    """An image of stripes plus noise: a task a tiny CNN learns in a few epochs."""
    period = rng.integers(4, 9)
    line = (np.arange(size) // (period // 2)) % 2
    pattern = line[:, None] if orientation == "horizontal" else line[None, :]
    pattern = np.broadcast_to(pattern, (size, size)).astype(np.float32)
    pixels = pattern * 160 + 40 + rng.normal(0, 20, (size, size))
    color = rng.uniform(0.6, 1.0, 3)
    return Image.fromarray(np.clip(pixels[..., None] * color, 0, 255).astype(np.uint8))


def write_stripes(folder, per_class=60, seed=0):
    """Writes folder/{horizontal,vertical}/*.jpg."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for index in range(per_class):
            stripes(name, rng).save(os.path.join(folder, name, f"{name}-{index:03d}.jpg"), quality=92)


def prepare_stripes(folder, per_class, num_shards=None):
    """Writes stripes to folder/images and runs the real `trainer prepare` into folder/data.

    Returns:
      The URL of folder/data/dataset.json.
    """
    write_stripes(str(folder / "images"), per_class=per_class)
    shards = [f"--num_shards={num_shards}"] if num_shards else []
    run_trainer("prepare", f"--source={folder / 'images'}", f"--output={folder / 'data'}", "--workers=1", *shards,
                check=True)
    return str(folder / "data" / "dataset.json")


def free_ports(count):
    """`count` distinct free TCP ports on loopback."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def start_trainer(args, env=None, log_path=None):
    """Starts `trainer <args>` in the background; stdout+stderr go to log_path."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115 (closed by the caller's wait)
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})


def wait_until(predicate, timeout, interval=0.2):
    """Polls `predicate` until true; returns False on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


# What a training log says at the end of each phase (trainer.train.phases.fit_phase).
PHASE_FINISHED = re.compile(r"phase (\w+) finished: optimizer step (\d+), weights fingerprint (\w+)")


def optimizer_steps(log_text):
    """{phase: optimizer step} from a training log's 'phase X finished' lines."""
    return {phase: int(step) for phase, step, _ in PHASE_FINISHED.findall(log_text)}


def fingerprints(log_text):
    """{phase: weights fingerprint} from a training log."""
    return {phase: fingerprint for phase, _, fingerprint in PHASE_FINISHED.findall(log_text)}


# ---------------------------------------------------------------- datasets from crafted records


def record(encoded, image_format, label, class_name, filename, height, width):
    """One record as `trainer prepare` stores it (the fields of trainer.formats.tfrecord.make_example)."""
    return {"encoded": encoded, "image_format": image_format, "label": label, "class_name": class_name,
            "filename": filename, "height": height, "width": width}


def write_records_dataset(folder, classes, splits):
    """Shards and dataset.json as `trainer prepare` writes them, from crafted records, with the
    product's own writer (trainer.formats.tfrecord's framing, trainer.formats.manifest's manifest).

    Args:
      folder: a local folder or URL.
      classes: index -> class name.
      splits: {split: [records of shard 0, records of shard 1, ...]} (records from `record`).

    Returns:
      The URL of dataset.json.
    """
    from trainer.formats import manifest, tfrecord
    from trainer.prepare.shards import image_stats

    entries = {}
    for split in manifest.SPLITS:
        shards, labels = [], []
        parts = splits.get(split, [])
        for number, records in enumerate(parts):
            name = manifest.shard_name(split, number, len(parts))
            data = b"".join(tfrecord.frame(tfrecord.make_example(**item)) for item in records)
            storage.write_bytes(storage.join(folder, name), data)
            shards.append({"file": name, "records": len(records), "bytes": len(data)})
            labels += [item["label"] for item in records]
        entries[split] = {"count": len(labels), "shards": shards,
                          "class_counts": {name: labels.count(index) for index, name in enumerate(classes)}}
    items = [item for parts in splits.values() for records in parts for item in records]
    sizes = {axis: [item[axis] for item in items] for axis in ("width", "height")}
    report = {"sizes": {"count": len(items), **{axis: [min(values), max(values), sum(values)]
                                                for axis, values in sizes.items()}}}
    url = storage.join(folder, manifest.MANIFEST_NAME)
    storage.write_json(url, manifest.new_manifest(
        source="crafted records", layout="split_dirs", val_fraction=None, test_fraction=None, split_seed=0,
        max_side=None, classes=list(classes), splits=entries, image_stats=image_stats([report]), skipped=[], ignored=[],
        duplicates=[], warnings=[], seconds=0.0))
    return url


def assert_tensorboard_matches_history(job_dir, local_dir):
    """Every epoch of history.json is in job_dir's TensorBoard event files, with the same values
    (train and validation metrics, and the learning rate), read back with TensorFlow's reader."""
    import tensorflow as tf

    from trainer.infra import folders

    folders.copy_tree(storage.join(job_dir, "tensorboard"), str(local_dir))
    found = {}  # (phase, tag) -> {epoch: value}
    for root, _, names in os.walk(local_dir):
        for name in names:
            phase, kind = os.path.relpath(root, local_dir).split(os.sep)
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    tag = value.tag.replace("epoch_", "val_" if kind == "validation" else "", 1)
                    found.setdefault((phase, tag), {})[event.step] = float(tf.make_ndarray(value.tensor))
    history = storage.read_json(storage.join(job_dir, "history.json"))
    for phase in history["phases"]:
        assert phase["epochs"], phase
        for entry in phase["epochs"]:
            for tag, value in entry.items():
                if tag not in ("epoch", "step"):
                    assert found.get((phase["name"], tag), {}).get(entry["epoch"]) == pytest.approx(value), \
                        (phase["name"], tag, entry["epoch"], found.get((phase["name"], tag)))
    return found


def closed(schema):
    """An OpenAPI schema with unknown fields refused wherever it lists the known ones (as the API
    server's strict field validation does; structural schemas otherwise prune them silently)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: closed(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        schema["additionalProperties"] = False
    return schema
