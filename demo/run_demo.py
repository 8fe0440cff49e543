"""`make demo`: the whole job, offline, on an embedded dataset, with a real GCS server on loopback.

1. Writes scikit-learn's handwritten digits (1,797 real scans, 10 classes) as JPEG files in class
   folders, and uploads them to a bucket on fake-gcs-server (started here, on 127.0.0.1).
2. `trainer prepare` gs://demo/images -> gs://demo/data (sharded TFRecords + dataset.json).
3. `trainer train --flagfile=configs/demo.flags` (2 CPU replicas, both phases) -> gs://demo/job.
4. `trainer evaluate` on the test split, `trainer predict` on a few files.
5. Copies everything to demo_output/ (the server's storage disappears when it stops) and prints
   the test accuracy and where each artifact is.

The commands are the real ones a user runs on a cluster; only the bucket is local.
"""

import argparse
import os
import shutil
import subprocess
import sys
import time

# gcsfs would otherwise probe each bucket over gRPC, which the emulator never answers (60 s each).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def write_digits(folder, size=32):
    """Writes the digits as size x size greyscale JPEGs in folder/<digit>/; returns the count."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        image = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        image = image.resize((size, size), Image.BILINEAR)
        os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
        image.save(os.path.join(folder, str(label), f"digit-{index:04d}.jpg"), quality=95)
    return len(digits.images)


def trainer(*args):
    """Runs one real `trainer` command, streaming its output; stops the demo if it fails."""
    command = [sys.executable, "-m", "trainer.cli", *args]
    print(f"\n$ trainer {' '.join(args)}", flush=True)
    started = time.time()
    result = subprocess.run(command)
    if result.returncode != 0:
        raise SystemExit(f"demo: `trainer {args[0]}` failed with exit code {result.returncode}")
    print(f"  ({time.time() - started:.0f} s)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo_output", help="local folder for the results")
    options = parser.parse_args()

    from trainer.infra import folders, storage
    from trainer.infra.localgcs import GCSServer

    started = time.time()
    output = os.path.abspath(options.output)
    shutil.rmtree(output, ignore_errors=True)
    images = os.path.join(output, "images")
    count = write_digits(images)
    print(f"wrote {count} digit images to {images}")

    server = GCSServer().start()  # sets STORAGE_EMULATOR_HOST for this process and the trainer commands
    print(f"GCS server on {server.url}")
    try:
        import fsspec

        fsspec.filesystem("gs", use_listings_cache=False).mkdir("demo")
        folders.copy_tree(images, "gs://demo/images")
        data, job = "gs://demo/data", "gs://demo/job"
        trainer("prepare", "--source=gs://demo/images", f"--output={data}", "--shard_size_mb=0.5")
        trainer("train", "--flagfile=configs/demo.flags", f"--data={data}/dataset.json", f"--job_dir={job}")
        trainer("evaluate", f"--model={job}/model", f"--data={data}/dataset.json", "--split=test",
                f"--output={job}/eval")
        trainer("predict", f"--model={job}/model", "--input=gs://demo/images/7/digit-00*.jpg",
                f"--output={job}/predictions.csv")
        folders.copy_tree(job, os.path.join(output, "job"))
        folders.copy_tree(data, os.path.join(output, "data"))
        metrics = storage.read_json(os.path.join(output, "job", "eval", "metrics.json"))
    finally:
        server.stop()

    job_local = os.path.join(output, "job")
    print(f"\nDemo finished in {time.time() - started:.0f} s.")
    print(f"Test accuracy: {metrics['accuracy']:.3f} on {metrics['examples']} test images "
          f"(10 classes: chance is 0.10)")
    print("Artifacts (copied from the GCS server to local disk):")
    for label, path in [
        ("dataset (shards, dataset.json, samples.png, class_counts.png)", os.path.join(output, "data")),
        ("exported SavedModel", os.path.join(job_local, "model")),
        ("metrics", os.path.join(job_local, "eval", "metrics.json")),
        ("pictures", os.path.join(job_local, "eval", "*.png")),
        ("training history", os.path.join(job_local, "history.json")),
        ("TensorBoard logs", os.path.join(job_local, "tensorboard")),
        ("predictions", os.path.join(job_local, "predictions.csv")),
    ]:
        print(f"  {label:<34} {path}")


if __name__ == "__main__":
    main()
