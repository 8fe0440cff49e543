"""Shared by the benchmarks: photo-like JPEGs from scikit-image's sample photos, interleaved timing.

The images are random crops of the real photographs that scikit-image ships (astronaut, coffee,
chelsea, rocket, ...), resized and cropped to the Kaggle dogs-vs-cats size (about 500 x 375,
some portrait), so JPEG decode costs what it costs on real photos; synthetic noise or flat colour
would decode at a very different speed.
"""

import io
import json
import os
import platform
import statistics
import time

import numpy as np

# Sample photos that ship inside scikit-image (no download). Greyscale ones become RGB, as a few
# Kaggle photos are.
_PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "stereo_motorcycle", "camera", "grass", "gravel", "brick"]
CLASSES = ["cats", "dogs"]
SPLIT_FRACTIONS = {"train": 0.70, "val": 0.15, "test": 0.15}


def load_photos():
    """The scikit-image sample photos as uint8 RGB arrays (the motorcycle pair gives two)."""
    import skimage.data

    photos = []
    for name in _PHOTOS:
        loaded = getattr(skimage.data, name)()
        for array in loaded[:2] if isinstance(loaded, tuple) else [loaded]:
            array = np.asarray(array)
            if array.ndim == 2:
                array = np.stack([array] * 3, axis=-1)
            photos.append(np.ascontiguousarray(array[..., :3].astype(np.uint8)))
    return photos


def make_jpeg(photos, rng, size=(500, 375)):
    """One JPEG: a random crop of a random photo, at `size` (width, height) or its portrait twin.

    Returns:
      The encoded bytes.
    """
    from PIL import Image

    width, height = size if rng.random() < 0.8 else size[::-1]
    photo = photos[rng.integers(len(photos))]
    # Scale so the crop fits, then up to 1.6x more so crops of one photo differ in content and scale.
    scale = max(width / photo.shape[1], height / photo.shape[0]) * rng.uniform(1.0, 1.6)
    resized = Image.fromarray(photo).resize(
        (max(width, round(photo.shape[1] * scale)), max(height, round(photo.shape[0] * scale))),
        Image.BILINEAR)
    left = rng.integers(resized.width - width + 1)
    top = rng.integers(resized.height - height + 1)
    image = resized.crop((left, top, left + width, top + height))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    # Kaggle's photos come from many cameras and sites: vary the quality like they do.
    image.save(buffer, format="JPEG", quality=int(rng.integers(75, 93)))
    return buffer.getvalue()


def write_split_folders(folder, count, seed=0, size=(500, 375)):
    """Writes `count` photo-like JPEGs as folder/{train,val,test}/{cats,dogs}/NNNNN.jpg (70/15/15).

    Args:
      folder: a local folder (created).
      count: total number of images over the three splits.
      seed: seed of the crops, qualities and assignment to splits and classes.
      size: (width, height) of landscape images; a fifth are portrait.

    Returns:
      {split: number of images}.
    """
    rng = np.random.default_rng(seed)
    photos = load_photos()
    counts = {split: 0 for split in SPLIT_FRACTIONS}
    bounds = np.cumsum(list(SPLIT_FRACTIONS.values())) * count
    for index in range(count):
        split = list(SPLIT_FRACTIONS)[int(np.searchsorted(bounds, index, side="right"))]
        class_name = CLASSES[index % len(CLASSES)]
        class_dir = os.path.join(folder, split, class_name)
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"{index:05d}.jpg"), "wb") as file:
            file.write(make_jpeg(photos, rng, size))
        counts[split] += 1
    return counts


def time_pass(run_pass):
    """Runs one pass; returns (images, wall seconds, CPU seconds of this process, all threads)."""
    started, cpu_started = time.perf_counter(), time.process_time()
    images = run_pass()
    return images, time.perf_counter() - started, time.process_time() - cpu_started


def measure_interleaved(passes, rounds, log=print):
    """Times every pass once per round, rotating their order each round, after one warm-up each.

    Interleaving spreads slow phases of a shared machine (another job starting, a page-cache miss)
    over every loader instead of penalising whichever happened to run then; rotating the order
    stops one loader from always following the same neighbour. The CPU time per image is recorded
    too: other processes on the machine change it far less than they change the wall time.

    Args:
      passes: {name: callable running one full pass and returning the number of images}.
      rounds: timed passes per loader.
      log: where progress lines go.

    Returns:
      {name: {"images": n, "rates": [images/s per round], "median": median images/s,
              "cpu_us_per_image": median CPU microseconds per image (this process only)}}.
    """
    for name, run_pass in passes.items():
        images, seconds, _ = time_pass(run_pass)
        log(f"warm-up {name}: {images} images in {seconds:.1f} s")
    names = list(passes)
    results = {name: {"images": 0, "rates": [], "cpu": []} for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            images, seconds, cpu_seconds = time_pass(passes[name])
            results[name]["images"] = images
            results[name]["rates"].append(images / seconds)
            results[name]["cpu"].append(cpu_seconds / images * 1e6)
            log(f"round {round_index + 1}/{rounds} {name}: {images / seconds:.1f} images/s")
    for result in results.values():
        result["median"] = statistics.median(result["rates"])
        result["cpu_us_per_image"] = round(statistics.median(result.pop("cpu")), 1)
    return results


def describe_machine():
    """nproc, CPU model, RAM and load: what a reader needs to compare numbers across machines."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory_gib = None
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model,
            "memory_gib": round(memory_gib, 1) if memory_gib else None,
            "load_average": [round(value, 2) for value in os.getloadavg()],
            "python": platform.python_version()}


def write_json(path, value):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(value, file, indent=2)
        file.write("\n")
