"""The one place that chooses which Keras the trainer uses.

Keras 2 (`tf_keras`) and not Keras 3: with TensorFlow 2.21, Keras 3's `model.fit` fails under
MultiWorkerMirroredStrategy (keras-team/keras#20585), and its `BackupAndRestore` replays an
interrupted epoch from its first batch, while tf_keras resumes at the exact step. Everything else
imports `keras` from here, so switching back is this one line.
"""

import tf_keras as keras  # noqa: F401


def keras3():
    """Keras 3 (installed with TensorFlow), for its preprocessing layers inside tf.data only:
    RandAugment, MixUp and CutMix (trainer.data.augment). They run on tensors of the input pipeline
    with the TensorFlow backend and never meet the tf-keras model. Imported on first use."""
    import keras as keras_3

    return keras_3
