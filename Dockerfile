# The trainer image: `docker run IMAGE train --data=... --job_dir=...` (ENTRYPOINT is `trainer`).
#   make image IMAGE=REGISTRY/REPO/image-transfer-trainer:TAG && make push IMAGE=...
#
# Base: the TensorFlow GPU image of the same TensorFlow that setup.py pins (tensorflow==2.21.*), so
# pip keeps its CUDA-matched TensorFlow. For fully reproducible builds also pin the digest:
#   docker buildx imagetools inspect tensorflow/tensorflow:2.21.0-gpu   (prints sha256:...)
#   FROM tensorflow/tensorflow:2.21.0-gpu@sha256:<that digest>
FROM tensorflow/tensorflow:2.21.0-gpu

# No credentials are baked in: on GKE, Workload Identity gives the pod short-lived tokens through
# the metadata server; elsewhere mount Application Default Credentials at run time.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/trainer

# Only what the package needs (.dockerignore keeps the rest out of the build context).
COPY setup.py requirements-prepare.txt ./
COPY trainer/ trainer/
COPY configs/ configs/
# The GPU-node benchmark runs from this image too (`make submit-bench`, docs/benchmarks.md §4).
COPY bench/ bench/

# A regular (not editable) install; configs/ stays in the workdir for --flagfile=configs/....
RUN python3 -m pip install --no-cache-dir . \
    && python3 -c "import trainer.cli" \
    && groupadd --gid 10001 trainer \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --shell /usr/sbin/nologin trainer

# Numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd. The manifests mount
# emptyDirs at /tmp (TMPDIR: local scratch) and at HOME (Keras' weight cache), so the root
# filesystem can stay read-only.
USER 10001:10001
ENV HOME=/home/trainer \
    TMPDIR=/tmp

ENTRYPOINT ["trainer"]
CMD ["--help"]
