"""The image-decode contract: encoded bytes -> the pixels the model sees. Serving shares it.

Training and evaluation (trainer.data.pipeline), damage diagnosis (trainer.data.records) and the exported
serving signature (trainer.train.export) all call `decode_image`, so the pixels a model sees in
production are computed exactly as in training. Pixels are float32 RGB in 0-255, shape
[image_size, image_size, 3]; the model does its own normalisation.
"""

import tensorflow as tf

# JPEG decoders can scale by 1/2, 1/4 or 1/8 while decoding (in the DCT domain), for much less work.
JPEG_SCALES = (1, 2, 4, 8)


def decode_image(encoded, image_size, small=False):
    """Decodes JPEG or PNG bytes to float32 RGB 0-255 resized to `image_size` x `image_size`.

    A JPEG whose shorter side is at least twice `image_size` is decoded at the largest of 1/2, 1/4,
    1/8 scale that keeps its shorter side at or above `image_size` (libjpeg scales while it
    decodes), then resized: the decode is the input pipeline's main cost, and this cuts it by ~15%
    for a 500x375 photo at 150 px and several times for camera-sized photos, which serving gets
    as they are. Smaller JPEGs, and PNGs, decode exactly as `tf.io.decode_image` does.

    `small=True` promises that no side exceeds 2 x `image_size` (shards prepared with a small
    enough `--max_side`): the same pixels, without the ~12 us per image of choosing a scale.
    """
    if small:
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    else:
        image = tf.cond(tf.io.is_jpeg(encoded), lambda: _decode_jpeg_scaled(encoded, image_size),
                        lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _decode_jpeg_scaled(encoded, image_size):
    height_width = tf.image.extract_jpeg_shape(encoded)[:2]
    shorter = tf.reduce_min(height_width)
    # Index into JPEG_SCALES of the largest scale that keeps the shorter side >= image_size.
    index = tf.reduce_sum(tf.cast(shorter >= image_size * tf.constant(JPEG_SCALES[1:]), tf.int32))
    branches = [lambda ratio=ratio: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio) for ratio in JPEG_SCALES]
    return tf.switch_case(index, branches)
