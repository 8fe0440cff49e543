"""Generated test images, written to a local folder or any URL (gs://) through `trainer.infra.storage`.

Plain functions for every test that needs image files:

    from imagegen import write_images, write_bad_files
    write_images(root, "class_dirs")                    # cats/cats_0000.jpg ... dogs/dogs_0005.jpg
    write_images(root, "split_dirs", per_class=2)       # train/cats/..., val/..., test/...
    write_images(root, "filename_prefix", classes=("cat", "dog"))   # cat.0000.jpg, dog.0000.jpg
    write_images(root, "class_dirs", fmt=("jpeg", "png", "cmyk"))   # formats cycle per image
    write_bad_files(root, "cats")                       # truncated, corrupt, non-image, empty files

Images are deterministic and learnable: class k has its own colour and stripe direction, and each
image its own noise, so a tiny model can tell the classes apart.
"""

import io

import numpy as np
from PIL import Image

from trainer.infra import storage

LAYOUTS = ("class_dirs", "split_dirs", "filename_prefix")
# fmt -> (file extension, what the file holds)
FORMATS = {
    "jpeg": ("jpg", "RGB JPEG"),
    "png": ("png", "RGB PNG"),
    "grey": ("jpg", "greyscale (L) JPEG"),
    "grey_png": ("png", "greyscale (L) PNG"),
    "cmyk": ("jpg", "CMYK JPEG"),
    "rgba": ("png", "RGBA PNG with a varying alpha"),
    "palette": ("png", "palette (P) PNG"),
    "png16": ("png", "16-bit greyscale PNG"),
    "bmp": ("bmp", "RGB BMP"),
    "gif": ("gif", "palette GIF"),
    "webp": ("webp", "RGB WebP (lossless)"),
}
# kind -> (file extension, what the file holds); every one of them must be skipped by `prepare`.
BAD_KINDS = {
    "truncated_jpeg": ("jpg", "a JPEG cut in half"),
    "truncated_png": ("png", "a PNG cut in half"),
    "corrupt_png": ("png", "a PNG whose compressed pixel data has flipped bytes"),
    "not_image": ("jpg", "text with an image extension"),
    "empty": ("jpg", "zero bytes"),
}
COLOURS = [(200, 40, 40), (40, 60, 200), (40, 170, 60), (220, 180, 30), (150, 50, 170), (30, 170, 170)]
DEFAULT_SPLIT_FOLDERS = ("train", "validation", "test")


def make_image(class_index=0, size=(40, 30), seed=0):
    """An RGB Pillow image of `size` (width, height) whose look depends on its class.

    Args:
      class_index: class k gets colour COLOURS[k % 6], horizontal stripes if k is even, else vertical.
      size: (width, height) in pixels.
      seed: per-image noise, so no two images are identical.
    """
    width, height = size
    rng = np.random.default_rng([class_index, seed])
    rows, columns = np.mgrid[0:height, 0:width]
    stripes = ((rows if class_index % 2 == 0 else columns) // 4) % 2
    colour = np.array(COLOURS[class_index % len(COLOURS)], dtype=np.float64)
    pixels = colour * (0.55 + 0.45 * stripes[..., None]) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def encode_image(image, fmt="jpeg"):
    """Encodes an RGB Pillow image as one of FORMATS; returns the bytes."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, "JPEG", quality=90)
    elif fmt == "png":
        image.save(buffer, "PNG")
    elif fmt == "grey":
        image.convert("L").save(buffer, "JPEG", quality=90)
    elif fmt == "grey_png":
        image.convert("L").save(buffer, "PNG")
    elif fmt == "cmyk":
        image.convert("CMYK").save(buffer, "JPEG", quality=90)
    elif fmt == "rgba":
        rgba = image.convert("RGBA")
        alpha = np.linspace(60, 255, image.size[0] * image.size[1]).reshape(image.size[::-1])
        rgba.putalpha(Image.fromarray(alpha.astype(np.uint8), "L"))
        rgba.save(buffer, "PNG")
    elif fmt == "palette":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, "PNG")
    elif fmt == "png16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(grey).save(buffer, "PNG")  # uint16 -> mode I;16
    elif fmt == "bmp":
        image.save(buffer, "BMP")
    elif fmt == "gif":
        image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64).save(buffer, "GIF")
    elif fmt == "webp":
        image.save(buffer, "WEBP", lossless=True)
    else:
        raise ValueError(f"unknown image format {fmt!r}; one of {', '.join(FORMATS)}")
    return buffer.getvalue()


def image_bytes(fmt="jpeg", class_index=0, size=(40, 30), seed=0):
    """`make_image` encoded as `fmt` (see FORMATS)."""
    return encode_image(make_image(class_index, size, seed), fmt)


def bad_bytes(kind):
    """The bytes of a file `prepare` must skip (see BAD_KINDS)."""
    if kind == "truncated_jpeg":
        data = image_bytes("jpeg", size=(64, 48))
        return data[: len(data) // 2]
    if kind == "truncated_png":
        data = image_bytes("png", size=(64, 48))
        return data[: len(data) // 2]
    if kind == "corrupt_png":
        data = image_bytes("png", size=(64, 48))
        start = data.index(b"IDAT") + 20  # inside the compressed pixels; the header stays valid
        return data[:start] + bytes(byte ^ 0xFF for byte in data[start:start + 60]) + data[start + 60:]
    if kind == "not_image":
        return b"these are notes about the photos, not a photo\n"
    if kind == "empty":
        return b""
    raise ValueError(f"unknown bad file kind {kind!r}; one of {', '.join(BAD_KINDS)}")


def write_file(root, relative, data):
    """Writes `data` to `root/relative` (`relative` uses `/`); returns `relative`."""
    storage.write_bytes(storage.join(root, *relative.split("/")), data)
    return relative


def image_path(layout, class_name, index, fmt="jpeg", split="train"):
    """The relative path `write_images` uses for one image."""
    extension = FORMATS[fmt][0]
    if layout == "class_dirs":
        return f"{class_name}/{class_name}_{index:04d}.{extension}"
    if layout == "split_dirs":
        return f"{split}/{class_name}/{class_name}_{index:04d}.{extension}"
    if layout == "filename_prefix":
        return f"{class_name}.{index:04d}.{extension}"
    raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")


def write_images(root, layout, classes=("cats", "dogs"), per_class=6, size=(40, 30), fmt="jpeg",
                 split_folders=DEFAULT_SPLIT_FOLDERS, start=0):
    """Writes generated images in one of the three source layouts.

    Args:
      root: a local folder or URL (created as needed).
      layout: "class_dirs" (`cats/cats_0000.jpg`), "split_dirs" (`train/cats/cats_0000.jpg`, with
        `per_class` images per class in EACH of `split_folders`) or "filename_prefix"
        (`cats.0000.jpg`: the class is the name before the first dot).
      classes: class names; class k gets make_image's look k.
      per_class: images per class (per class and split folder for split_dirs).
      size: (width, height) of every image.
      fmt: one of FORMATS, or a sequence of them used in turn (image i gets fmt[i % len(fmt)]).
      split_folders: the split folder names for split_dirs (`validation` is the `val` split).
      start: index of the first image, so that a second call adds files next to the first ones.

    Returns:
      The relative paths written (with `/`), in writing order.
    """
    formats = [fmt] if isinstance(fmt, str) else list(fmt)
    folders = split_folders if layout == "split_dirs" else ("train",)
    written = []
    for split_number, split in enumerate(folders):
        for class_index, class_name in enumerate(classes):
            for index in range(start, start + per_class):
                image_format = formats[index % len(formats)]
                relative = image_path(layout, class_name, index, image_format, split)
                data = image_bytes(image_format, class_index, size, seed=index * 7 + split_number)
                written.append(write_file(root, relative, data))
    return written


def write_bad_files(root, folder="", kinds=tuple(BAD_KINDS), name_prefix="bad_"):
    """Writes one file of each bad kind into `root/folder`.

    Args:
      root: a local folder or URL.
      folder: sub-folder (e.g. a class folder "cats", or "train/cats"); "" for the top.
      kinds: which of BAD_KINDS to write.
      name_prefix: start of each file name: "bad_" gives `bad_truncated_jpeg.jpg`; for the
        filename_prefix layout use e.g. "cats.bad_" so the file still names a class.

    Returns:
      The relative paths written (with `/`).
    """
    written = []
    for kind in kinds:
        name = f"{name_prefix}{kind}.{BAD_KINDS[kind][0]}"
        relative = f"{folder.strip('/')}/{name}" if folder else name
        written.append(write_file(root, relative, bad_bytes(kind)))
    return written
