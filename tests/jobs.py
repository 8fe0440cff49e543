"""Helpers for tests that run real training jobs: learnable images, ports, background processes."""

import os
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

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
    from conftest import run_trainer

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


def optimizer_steps(log_text):
    """{phase: optimizer step} from a training log's 'phase X finished' lines."""
    steps = {}
    for line in log_text.splitlines():
        if "finished: optimizer step" in line:
            phase = line.split("phase ", 1)[1].split(" ", 1)[0]
            steps[phase] = int(line.split("optimizer step ", 1)[1].split(",", 1)[0])
    return steps


def fingerprints(log_text):
    """{phase: weights fingerprint} from a training log."""
    found = {}
    for line in log_text.splitlines():
        if "weights fingerprint" in line:
            phase = line.split("phase ", 1)[1].split(" ", 1)[0]
            found[phase] = line.rsplit("weights fingerprint ", 1)[1].strip()
    return found
