"""A quiet TensorFlow start: the lines TensorFlow prints on every start are no news to a user.

When TensorFlow is first imported (only by commands that need it, and only once the flags are
checked), its start-up lines are filtered out of stderr (any other line it prints is kept); the
libraries' own INFO lines (checkpoint sharding, fingerprints, Keras's slow-callback warning) stay
out of the log. The command line calls `quiet_tensorflow_start` unless `--verbosity=1` or more.
"""

import importlib.abc
import importlib.machinery
import logging as std_logging
import os
import re
import sys
import tempfile

from absl import logging

# What TensorFlow prints on every start (its C++ logging, before absl's is set up): none of it is
# news on a CPU machine or a working GPU one.
TENSORFLOW_START_NOISE = re.compile(
    r"All log messages before absl::InitializeLog|oneDNN custom operations are on|Could not find cuda drivers|"
    r"failed call to cuInit|Unable to register cu(DNN|FFT|BLAS) factory|computation placer already registered|"
    r"This TensorFlow binary is optimized to use available CPU instructions|TF-TRT Warning|"
    r"To enable the following instructions")
_LIBRARY_FILES = re.compile(r"[/\\]site-packages[/\\](tensorflow|tf_keras|keras)[/\\]")


def quiet_tensorflow_start():
    """Filters TensorFlow's start-up lines from stderr, and the libraries' INFO lines from the log."""
    logging.get_absl_handler().addFilter(_drop_library_chatter)
    sys.meta_path.insert(0, _QuietTensorFlowImport())


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` as usual, with a loader that runs its import (and CUDA's initialisation,
    which prints the last such line) with stderr captured and filtered."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None:
            spec.loader = _FilteredLoader(spec.loader)
        return spec


class _FilteredLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as captured:
            os.dup2(captured.fileno(), 2)
            try:
                self.loader.exec_module(module)
                module.config.list_physical_devices("GPU")  # CUDA is initialised (or fails to be) here
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                captured.seek(0)
                for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                    if not TENSORFLOW_START_NOISE.search(line):
                        sys.stderr.write(line)


def _drop_library_chatter(record):
    if not _LIBRARY_FILES.search(record.pathname or ""):
        return True
    return record.levelno >= std_logging.WARNING and "is slow compared to the batch time" not in record.getMessage()
