"""Image files: which names are images, and their bytes -> what a record stores (Pillow).

Used by `trainer prepare` (which files are images, what each record keeps) and `trainer predict`
(the same rule for which files it scores, and the same conversion of what TensorFlow cannot decode).

Every image is fully decoded once, so a truncated or corrupt file is found here and skipped with a
reason, never stored. The original bytes are kept for RGB or greyscale JPEGs within `max_side`;
other JPEGs (CMYK) become RGB JPEGs, other formats lossless RGB PNGs, and images over `max_side`
resized RGB JPEGs. No TensorFlow here: prepare's workers (processes, Beam workers) stay light.
"""

import contextlib
import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Pillow's names for files whose bytes TensorFlow's JPEG decoder reads as they are (MPO: the
# multi-picture JPEG many cameras write; its first frame is a plain JPEG).
JPEG_FORMATS = ("JPEG", "MPO")
# Modes of a JPEG kept byte for byte: `decode_image(channels=3)` turns both into RGB.
KEPT_JPEG_MODES = ("RGB", "L")
CONVERTED_JPEG_QUALITY = 95  # CMYK/YCCK JPEGs, and turned phone photos: near-lossless, still a JPEG
EXIF_ORIENTATION = 0x0112  # the EXIF tag that says how a camera held the picture (1: as stored)
RESIZED_JPEG_QUALITY = 90  # --max_side: the point is to cut bytes and decode time
# --max_pixels: more pixels than this in one image is a decompression bomb, not a photo (a 140 KB
# PNG can declare 12000 x 12000). 108 MP, the largest phone photos, stays within it.
MAX_PIXELS = 120_000_000
# --max_image_bytes: no photo is this large (a 108 MP JPEG is ~30 MB, an uncompressed 16-bit
# 100 MP TIFF 600 MB); reads stop here, so no stream (an endless http answer) can hold a worker.
MAX_IMAGE_BYTES = 1 << 30
# What counts as an image by name: what Pillow decodes and `trainer prepare` stores (as is, or
# converted to PNG/JPEG). Any other file is ignored, listed in dataset.json, and never a class.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                    ".ppm", ".pgm", ".pbm", ".pnm", ".ico")


def is_image_name(path):
    return path.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden(relative_path):
    """Whether a path (relative to the folder listed, `/`-separated) is hidden: a part of it starts
    with a dot (`.DS_Store`, `.cache/x.jpg`, `..jpg`). Neither prepare nor predict reads those."""
    return any(part.startswith(".") for part in relative_path.split("/"))


@contextlib.contextmanager
def strict_decoding():
    """A truncated image must fail, not come back padded with grey (whatever the process set)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def fit_within(size, max_side):
    """`(width, height)` scaled so the longer side is `max_side`, keeping the aspect ratio."""
    width, height = size
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image):
    """Any Pillow image as 8-bit RGB (alpha dropped, as `tf.io.decode_image(channels=3)` does)."""
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow's I/I;16 -> L conversion clips at 255 instead of scaling 16-bit values down.
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(np.round(values / scale), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _encoded(image, image_format, quality=None):
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, "JPEG", quality=quality)
    else:
        image.save(buffer, "PNG")
    return {"encoded": buffer.getvalue(), "format": image_format,
            "width": image.size[0], "height": image.size[1]}


class TooManyPixels(ValueError):
    """An image whose header declares more pixels than allowed (decoding it could exhaust memory)."""


def encode_image(data, max_side=None, max_pixels=MAX_PIXELS):
    """Fully decodes one image and returns what its record stores.

    Original bytes are kept for RGB or greyscale JPEGs within `max_side` that are stored upright;
    other JPEGs (CMYK, or with an EXIF orientation: a phone held sideways) become RGB JPEGs, other
    formats lossless RGB PNGs, and images over `max_side` resized RGB JPEGs. The EXIF orientation
    is applied (the pixels turned as a photo viewer shows them), so that every record, and every
    image predict scores, is upright: the model learns what people see.

    Returns:
      dict with `encoded` (bytes), `format` ("jpeg" or "png"), `width`, `height` of the stored image.

    Raises:
      TooManyPixels: the header declares more than `max_pixels` pixels (nothing is decoded).
      Whatever Pillow raises for a file it cannot fully decode.
    """
    image = Image.open(io.BytesIO(data))
    if max_pixels and image.size[0] * image.size[1] > max_pixels:
        raise TooManyPixels(f"{image.size[0]} x {image.size[1]} pixels, more than --max_pixels={max_pixels}")
    target = fit_within(image.size, max_side) if max_side and max(image.size) > max_side else None
    if target and image.format in JPEG_FORMATS:
        # Decode at 1/2, 1/4 or 1/8 scale (still at least `target`): several times faster.
        image.draft(None, target)
    image.load()  # the full decode: truncated or corrupt data fails here
    source_format = image.format
    turned = image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None)
    if target is None and source_format in JPEG_FORMATS and image.mode in KEPT_JPEG_MODES and not turned:
        return {"encoded": data, "format": "jpeg", "width": image.size[0], "height": image.size[1]}
    if turned:
        image = ImageOps.exif_transpose(image)
        if target:
            target = fit_within(image.size, max_side)
    rgb = to_rgb(image)
    if target:
        return _encoded(rgb.resize(target, Image.Resampling.LANCZOS), "jpeg", RESIZED_JPEG_QUALITY)
    if source_format in JPEG_FORMATS:
        return _encoded(rgb, "jpeg", CONVERTED_JPEG_QUALITY)
    return _encoded(rgb, "png")


def _skip_reason(error):
    if isinstance(error, UnidentifiedImageError):
        return "not an image (or an unreadable header)"
    if isinstance(error, TooManyPixels):
        return f"too many pixels: {error}"
    if isinstance(error, Image.DecompressionBombError):
        return "too many pixels (Pillow's decompression-bomb limit)"
    message = " ".join(str(error).split())[:200]
    if "truncated" in message:
        return "truncated image"
    return f"corrupt image ({type(error).__name__}: {message})"


def too_large(data, max_bytes):
    """The skip reason for data read with a `max_bytes` cap (`storage.read_many`) that hit it, or None."""
    if max_bytes and data is not None and len(data) > max_bytes:
        return f"too large: more than --max_image_bytes={max_bytes} bytes"
    return None


def encode_or_skip(data, max_side=None, max_pixels=MAX_PIXELS):
    """`encode_image(data, max_side, max_pixels)`, or `{"skip": reason}` for data that is not a
    whole image or has too many pixels. Batch prediction calls it too, so that a model is given the
    very bytes training stored."""
    if not data:
        return {"skip": "empty file"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd EXIF, palettes, big images
            return encode_image(data, max_side, max_pixels)
    except Exception as error:  # Pillow raises many types for bad data; the reason names it
        return {"skip": _skip_reason(error)}
