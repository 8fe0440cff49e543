"""What the accelerators do while work runs: utilisation and memory of every GPU, sampled.

NVML (the `nvidia-ml-py` package, the library nvidia-smi uses) gives each GPU's utilisation and
memory; where NVML is absent but TensorFlow sees GPUs, TensorFlow's own peak memory is reported
without utilisation. On a machine without GPUs there is nothing to sample: `GpuSampler.take()`
returns None and nothing is logged or recorded (no error).
"""

import threading

SAMPLE_SECONDS = 0.5


def _nvml():
    """pynvml, initialised; None without NVML (no driver, no GPU, or the package missing)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ImportError: no NVML
        return None


def describe():
    """The GPUs of this machine: `{"count", "names", "driver", "memory_mib"}` (count 0 without any)."""
    nvml = _nvml()
    if nvml:
        handles = [nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())]
        return {"count": len(handles), "names": [_text(nvml.nvmlDeviceGetName(handle)) for handle in handles],
                "driver": _text(nvml.nvmlSystemGetDriverVersion()),
                "memory_mib": [nvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20 for handle in handles]}
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
    return {"count": len(gpus), "names": names, "driver": None, "memory_mib": None}


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


class GpuSampler:
    """Samples every GPU's utilisation and memory in a background thread, every SAMPLE_SECONDS.

    `take()` returns what was seen since the last `take()` and starts a new window:
    `{"gpu_utilization": mean % over GPUs and samples, "gpu_utilization_max": %,
      "gpu_memory_mib": the largest memory in use on any GPU}`, or None without GPUs.
    """

    def __init__(self):
        self._nvml = _nvml()
        self._handles = []
        self._tf_gpus = []
        if self._nvml:
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(index)
                             for index in range(self._nvml.nvmlDeviceGetCount())]
        else:
            import tensorflow as tf

            self._tf_gpus = [f"GPU:{index}" for index, _ in enumerate(tf.config.list_physical_devices("GPU"))]
        self._lock = threading.Lock()
        self._samples = []
        self._stop = threading.Event()
        if self._handles:
            threading.Thread(target=self._run, name="gpu-sampler", daemon=True).start()

    @property
    def active(self):
        return bool(self._handles or self._tf_gpus)

    def _run(self):
        while not self._stop.wait(SAMPLE_SECONDS):
            try:
                sample = [(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                           self._nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20) for handle in self._handles]
            except Exception:  # noqa: BLE001 - a GPU that stops answering must not stop training
                continue
            with self._lock:
                self._samples.append(sample)

    def take(self):
        if self._tf_gpus:  # TensorFlow's peak memory since the last reset; no utilisation
            import tensorflow as tf

            peaks = []
            for device in self._tf_gpus:
                peaks.append(tf.config.experimental.get_memory_info(device)["peak"] / 2**20)
                tf.config.experimental.reset_memory_stats(device)
            return {"gpu_memory_mib": round(max(peaks), 1)}
        with self._lock:
            samples, self._samples = self._samples, []
        if not samples:
            return None
        utilisation = [gpu for sample in samples for gpu, _ in sample]
        return {"gpu_utilization": round(sum(utilisation) / len(utilisation), 1),
                "gpu_utilization_max": float(max(utilisation)),
                "gpu_memory_mib": round(max(memory for sample in samples for _, memory in sample), 1)}

    def stop(self):
        self._stop.set()
