"""dataset.json + split -> tf.data.Dataset of (images, labels) for training and evaluation.

Images are float32 RGB pixel values in 0-255 (the model does its own normalisation), shape
[batch, image_size, image_size, 3]; labels are int32 class indices, shape [batch].
"""

import tensorflow as tf


def decode_image(encoded, image_size):
    """Decodes JPEG or PNG bytes to float32 RGB 0-255 resized to `image_size` x `image_size`.

    Training, evaluation and the exported serving signature all call this one function, so the
    pixels a model sees in production are computed exactly as in training.
    """
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.ensure_shape(image, [image_size, image_size, 3])
