"""Augmentation and the per-example extras of training batches, in one home.

  augment_image       a random flip, crop and brightness shift of one image (`--augment`)
  with_randaugment    Keras 3's RandAugment on batches (`--randaugment`)
  with_mixing         Keras 3's MixUp / CutMix on batches, with soft labels (`--mixup_alpha`, `--cutmix_alpha`)
  with_class_weights  each example's class weight (`--class_weight`)
  with_data_sharding  a dataset that tf.distribute splits by batch (DATA sharding), not by file

Keras 3's preprocessing layers run inside tf.data with the TensorFlow backend, next to the tf-keras
model (trainer.infra.kerasapi): the layers only ever see tensors of the input pipeline.
"""

import tensorflow as tf


def with_randaugment(dataset, magnitude, seed):
    """Batches of float 0-255 images through Keras 3's RandAugment (2 random operations per image).

    """
    from trainer.infra.kerasapi import keras3  # imported here: tf_keras is no cost of the data pipeline

    layer = keras3().layers.RandAugment(value_range=(0, 255), num_ops=2, factor=magnitude, seed=seed)
    return dataset.map(lambda images, labels: (layer(images, training=True), labels),
                       num_parallel_calls=tf.data.AUTOTUNE)


def with_mixing(dataset, num_classes, mixup_alpha, cutmix_alpha, seed):
    """Batches -> MixUp or CutMix batches (Keras 3's layers), with soft labels: P(class 1) [B] for
    two classes, [B, C] rows otherwise. With both, each batch gets one of the two at random."""
    from trainer.infra.kerasapi import keras3

    layers = ([keras3().layers.MixUp(alpha=mixup_alpha, seed=seed)] if mixup_alpha else []) + (
        [keras3().layers.CutMix(factor=cutmix_alpha, seed=seed)] if cutmix_alpha else [])

    def mix(images, labels):
        one_hot = tf.one_hot(tf.cast(labels, tf.int32), num_classes)
        if len(layers) == 1:
            mixed = layers[0]({"images": images, "labels": one_hot}, training=True)
        else:
            mixed = tf.cond(tf.random.uniform([]) < 0.5,
                            lambda: layers[0]({"images": images, "labels": one_hot}, training=True),
                            lambda: layers[1]({"images": images, "labels": one_hot}, training=True))
        soft = tf.cast(mixed["labels"], tf.float32)
        return tf.cast(mixed["images"], tf.float32), soft[:, 1] if num_classes == 2 else soft

    return dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE)


def with_class_weights(dataset, weights):
    """(x, y) batches -> (x, y, the weight of each example's class); unchanged for no weights. Soft
    labels (MixUp, CutMix) weigh as their mixture of classes. Training only: validation loss and
    accuracy stay unweighted, comparable across runs."""
    if not weights:
        return dataset
    table = tf.constant([weights[index] for index in range(len(weights))], tf.float32)

    def weigh(x, y):
        if y.dtype.is_integer:
            return x, y, tf.gather(table, tf.cast(y, tf.int32))
        if y.shape.rank == 1:  # two classes: y is P(class 1)
            return x, y, (1.0 - y) * table[0] + y * table[1]
        return x, y, tf.linalg.matvec(y, table)

    return dataset.map(weigh)


def with_data_sharding(dataset):
    """A dataset that tf.distribute shards by batch (each worker takes every N-th), not by file."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def augment_image(image, seed=None):
    """A random left-right flip, a random crop of 80-100% of each side zoomed back, a brightness shift.

    Args:
      image: float32 [S, S, 3], 0-255. Returns the same shape and range.
    """
    # Distinct op seeds: ops sharing one would draw the same random numbers.
    seeds = [None] * 4 if seed is None else [seed + i for i in range(4)]
    size = image.shape[0]
    image = tf.image.random_flip_left_right(image, seed=seeds[0])
    side = tf.cast(tf.round(tf.random.uniform([], 0.8, 1.0, seed=seeds[1]) * size), tf.int32)
    image = tf.image.random_crop(image, [side, side, 3], seed=seeds[2])
    image = tf.image.resize(image, [size, size], method="bilinear")
    image = tf.image.random_brightness(image, max_delta=0.1 * 255.0, seed=seeds[3])
    return tf.clip_by_value(image, 0.0, 255.0)
