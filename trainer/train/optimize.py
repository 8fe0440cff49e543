"""What a phase optimizes and how: the learning-rate schedule, the optimizer, the loss (with label
smoothing and soft labels) and the accuracy, and compiling a model with them."""

import tensorflow as tf

from trainer.infra.kerasapi import keras


def learning_rate_schedule(peak, schedule="constant", total_steps=None, warmup_steps=0):
    """A phase's learning rate: `peak` throughout, or a cosine from `peak` to 0 over `total_steps`
    after `warmup_steps` of linear warmup from 0 (Keras's CosineDecay). A function of the
    optimizer's step count, which BackupAndRestore restores: a resumed phase follows the same values."""
    if schedule == "constant":
        return peak
    if warmup_steps:
        return keras.optimizers.schedules.CosineDecay(
            0.0, max(1, total_steps - warmup_steps), warmup_target=peak, warmup_steps=warmup_steps)
    return keras.optimizers.schedules.CosineDecay(peak, max(1, total_steps))


def make_optimizer(name, learning_rate, weight_decay=0.0, momentum=0.9):
    """adam (the seed's), adamw (decoupled weight decay) or sgd (Nesterov momentum)."""
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum, nesterov=True,
                                    weight_decay=weight_decay or None)
    return keras.optimizers.Adam(learning_rate=learning_rate)


@keras.saving.register_keras_serializable(package="trainer")
class SparseCrossentropyWithSmoothing(keras.losses.Loss):
    """Categorical cross-entropy with label smoothing (tf-keras's sparse loss has none) for class
    indices [B], or for soft labels [B, C] (MixUp, CutMix) as they are."""

    def __init__(self, num_classes, label_smoothing, **kwargs):
        super().__init__(**kwargs)
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self._loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing,
                                                          reduction=keras.losses.Reduction.NONE)

    def call(self, y_true, y_pred):
        return self._loss(_as_distribution(y_true, self.num_classes, y_pred.dtype), y_pred)

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes, "label_smoothing": self.label_smoothing}


def _as_distribution(y_true, num_classes, dtype):
    """Class indices [B] (or [B, 1]) as one-hot rows; soft labels [B, C] as they are."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 2 and y_true.shape[-1] == num_classes:
        return tf.cast(y_true, dtype)
    return tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes, dtype=dtype)


def dominant_class_accuracy(num_classes):
    """Accuracy against the label's largest class: class indices, or soft labels of MixUp and CutMix
    (for two classes the label is P(class 1) and the output one sigmoid)."""

    def accuracy(y_true, y_pred):
        if num_classes == 2:
            truth = tf.reshape(tf.cast(y_true, tf.float32), [-1]) > 0.5
            return tf.cast(tf.equal(truth, tf.reshape(y_pred, [-1]) > 0.5), tf.float32)
        truth = tf.argmax(_as_distribution(y_true, num_classes, y_pred.dtype), axis=-1)
        return tf.cast(tf.equal(truth, tf.argmax(y_pred, axis=-1)), tf.float32)

    return keras.metrics.MeanMetricWrapper(accuracy, name="accuracy")


def compile_model(model, num_classes, learning_rate, jit_compile=False, optimizer=None, label_smoothing=0.0,
                  soft_labels=False):
    """Compiles with the loss and accuracy that fit the head's output.

    Labels are int32 class indices of shape [batch]. Two classes: binary cross-entropy and
    BinaryAccuracy against the [batch, 1] sigmoid output; more: sparse categorical cross-entropy
    and SparseCategoricalAccuracy. Both metrics are named "accuracy" (history keys `accuracy`,
    `val_accuracy`). `optimizer` defaults to Adam at `learning_rate` (the seed's). `soft_labels`:
    training labels may be soft (MixUp, CutMix), so the loss and accuracy take both kinds.
    """
    if num_classes == 2:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        accuracy = (dominant_class_accuracy(2) if soft_labels else keras.metrics.BinaryAccuracy(name="accuracy"))
    else:
        loss = (SparseCrossentropyWithSmoothing(num_classes, label_smoothing) if label_smoothing or soft_labels
                else keras.losses.SparseCategoricalCrossentropy())
        accuracy = (dominant_class_accuracy(num_classes) if soft_labels
                    else keras.metrics.SparseCategoricalAccuracy(name="accuracy"))
    model.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate=learning_rate), loss=loss,
                  metrics=[accuracy], jit_compile=jit_compile)


def mixed_precision_policy():
    """--mixed_precision's Keras policy: float16 with loss scaling on GPUs; CPUs (tests) have no
    fast float16, bfloat16 works there."""
    import tensorflow as tf

    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
