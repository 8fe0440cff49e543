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


def write_split_folders(folder, count, seed=0, size=(500, 375), learnable=False):
    """Writes `count` photo-like JPEGs as folder/{train,val,test}/{cats,dogs}/NNNNN.jpg (70/15/15).

    Args:
      folder: a local folder (created).
      count: total number of images over the three splits.
      seed: seed of the crops, qualities and assignment to splits and classes.
      size: (width, height) of landscape images; a fifth are portrait.
      learnable: crops of each class come from their own half of the sample photos (a model can
        tell the classes apart); otherwise from any photo (the labels carry no signal).

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
        sources = photos[index % len(CLASSES)::len(CLASSES)] if learnable else photos
        with open(os.path.join(class_dir, f"{index:05d}.jpg"), "wb") as file:
            file.write(make_jpeg(sources, rng, size))
        counts[split] += 1
    return counts


class OtherLoad:
    """CPU (in cores) used by every process outside this benchmark's own process tree.

    The build machine is shared: someone else's test run can take a core for minutes, halving a
    2-core loader's rate while a 1-thread loader barely notices. Reading the system's busy time
    and subtracting this tree's (the benchmark, its GCS server and proxy) tells the two apart.
    """

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.start()

    def _tree_seconds(self):
        total = 0.0
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except self.psutil.Error:
                pass
        return total

    def _busy_seconds(self):
        times = self.psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    def start(self):
        self.started = (time.perf_counter(), self._busy_seconds(), self._tree_seconds())

    def cores(self):
        """Cores used by other processes since `start()`."""
        wall, busy, tree = self.started
        elapsed = time.perf_counter() - wall
        return max(0.0, (self._busy_seconds() - busy) - (self._tree_seconds() - tree)) / max(elapsed, 1e-6)

    def wait_until_below(self, cores, timeout, interval=0.5):
        """Waits until other processes use under `cores` over `interval`; gives up after `timeout` s.

        Returns:
          The seconds waited.
        """
        waited = 0.0
        while waited < timeout:
            self.start()
            time.sleep(interval)
            if self.cores() < cores:
                break
            waited += interval
        return waited


def time_pass(run_pass, other_load=None):
    """Runs one pass.

    Returns:
      (images, wall seconds, CPU seconds of this process (all threads), cores other processes used
      meanwhile or None).
    """
    if other_load:
        other_load.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    result = run_pass()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    # A pass may time itself (to leave out a teardown): it then returns (images, seconds).
    images, seconds = result if isinstance(result, tuple) else (result, seconds)
    return images, seconds, cpu_seconds, other_load.cores() if other_load else None


def measure_interleaved(passes, rounds, log=print, quiet_cores=0.3, quiet_timeout=120.0):
    """Times every pass once per round, rotating their order each round, after one warm-up each.

    Interleaving spreads slow phases of a shared machine (another job starting, a page-cache miss)
    over every loader instead of penalising whichever happened to run then; rotating the order
    stops one loader from always following the same neighbour. Before each timed pass it waits
    (up to `quiet_timeout` s) until other processes use under `quiet_cores` cores, and records how
    much they used during the pass. The CPU time per image is recorded too: other processes change
    it far less than they change the wall time.

    Args:
      passes: {name: callable running one full pass and returning the number of images, or
        (images, seconds) when it times itself}.
      rounds: timed passes per loader.
      log: where progress lines go.
      quiet_cores: wait for other processes to use less than this many cores before each pass
        (None: do not wait).
      quiet_timeout: the longest wait before a pass, in seconds.

    Returns:
      {name: {"images": n, "rates": [images/s per round], "median": median images/s,
              "best": highest images/s, "cpu_us_per_image": median CPU microseconds per image
              (this process only), "other_cores": [cores other processes used during each pass]}}.
    """
    other_load = OtherLoad()
    for name, run_pass in passes.items():
        images, seconds, _, _ = time_pass(run_pass)
        log(f"warm-up {name}: {images} images in {seconds:.1f} s")
    names = list(passes)
    results = {name: {"images": 0, "rates": [], "cpu": [], "other_cores": []} for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if quiet_cores is not None:
                waited = other_load.wait_until_below(quiet_cores, quiet_timeout)
                if waited:
                    log(f"waited {waited:.0f} s for other processes to calm down")
            images, seconds, cpu_seconds, others = time_pass(passes[name], other_load)
            result = results[name]
            result["images"] = images
            result["rates"].append(images / seconds)
            result["cpu"].append(cpu_seconds / images * 1e6)
            result["other_cores"].append(round(others, 2))
            log(f"round {round_index + 1}/{rounds} {name}: {images / seconds:.1f} images/s "
                f"(other processes: {others:.2f} cores)")
    for result in results.values():
        result["median"] = statistics.median(result["rates"])
        result["best"] = max(result["rates"])
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


def positive_int(text):
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def write_json(path, value):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as file:
        json.dump(value, file, indent=2)
        file.write("\n")
