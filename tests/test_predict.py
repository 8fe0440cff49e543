"""trainer predict: folders, globs and gs:// prefixes -> one CSV row per image, through the real CLI."""

import csv
import io

import numpy as np
import pytest
import tensorflow as tf
from helpers import assert_fails_as, run_trainer
from PIL import Image

from trainer.data.decode import decode_image
from trainer.errors import UserError
from trainer.formats import imagefiles as prepare_encode
from trainer.infra import folders, storage
from trainer.serve import predict
from trainer.train import export, model

IMAGE_SIZE = 32
CLASSES = ["cats", "dogs"]


def encode(array, image_format):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def make_images():
    """relative path -> bytes: every supported format and case, one corrupt JPEG, one text file."""
    rng = np.random.RandomState(0)
    pixels = lambda height, width: rng.randint(0, 256, (height, width, 3), dtype=np.uint8)
    return {
        "a.jpg": encode(pixels(40, 48), "JPEG"),
        "broken.jpg": b"\xff\xd8\xff\xe0 this is not really a JPEG",
        "notes.txt": b"not an image",
        "sub/b.PNG": encode(pixels(20, 30), "PNG"),
        "sub/c.jpeg": encode(pixels(64, 64), "JPEG"),
        "sub/deeper/d.bmp": encode(pixels(33, 35), "BMP"),
        "sub/deeper/e.GIF": encode(pixels(16, 16), "GIF"),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export folder, Keras classifier): an untrained tiny model, weights moved off their init."""
    classifier = model.build_model("tiny", 2, IMAGE_SIZE, weights=None, head="avgpool", dense_units=16)
    rng = np.random.RandomState(0)
    classifier.set_weights([value + rng.normal(0, 0.05, value.shape).astype(value.dtype)
                            for value in classifier.get_weights()])
    export_dir = str(tmp_path_factory.mktemp("export") / "model")
    export.export_model(classifier, CLASSES, IMAGE_SIZE, export_dir, backbone="tiny")
    return export_dir, classifier


def write_folder(root, images):
    for relative, blob in images.items():
        storage.write_bytes(storage.join(root, *relative.split("/")), blob)


def read_csv(location):
    return list(csv.DictReader(io.StringIO(storage.read_text(location))))


def expected_dog_probability(classifier, blob):
    image = decode_image(blob, IMAGE_SIZE)
    return float(classifier(tf.expand_dims(image, 0), training=False).numpy()[0, 0])


def check_rows(rows, locations, images, classifier):
    """One row per image in `locations` (sorted), scored like the Keras model; broken -> error."""
    assert [row["path"] for row in rows] == sorted(locations)
    for row in rows:
        blob = images[row["path"].rsplit("images/", 1)[-1].replace("\\", "/")]
        if row["path"].endswith("broken.jpg"):
            assert row["predicted_class"] == "" and row["prob_cats"] == ""
            # The decoder's own one-line reason, not TensorFlow's multi-line graph error.
            assert row["error"].startswith("cannot decode: ")
            assert "\n" not in row["error"] and "Graph execution" not in row["error"]
            continue
        dog = expected_dog_probability(classifier, blob)
        assert float(row["prob_dogs"]) == pytest.approx(dog, abs=1e-4)
        assert float(row["prob_cats"]) == pytest.approx(1 - dog, abs=1e-4)
        assert row["predicted_class"] == ("dogs" if dog > 0.5 else "cats")
        assert row["error"] == ""


def test_cli_predict_on_a_folder(tmp_path, exported):
    export_dir, classifier = exported
    images = make_images()
    folder = str(tmp_path / "images")
    write_folder(folder, images)
    output = str(tmp_path / "out" / "preds.csv")

    result = run_trainer("predict", f"--model={export_dir}", f"--input={folder}", f"--output={output}",
                         "--batch_size=2", check=True)

    header = storage.read_text(output).splitlines()[0]
    assert header == "path,predicted_class,prob_cats,prob_dogs,error"
    image_names = [name for name in images if name != "notes.txt"]
    rows = read_csv(output)
    check_rows(rows, [storage.join(folder, *name.split("/")) for name in image_names], images, classifier)
    assert "broken.jpg" in result.stderr  # logged, not only in the CSV
    assert "100%" in result.stderr  # the progress bar reached the end


def test_an_image_over_max_image_bytes_keeps_its_row_with_the_reason(tmp_path, exported):
    export_dir, _ = exported
    images = {name: blob for name, blob in make_images().items() if name.endswith(".jpg") and "broken" not in name}
    write_folder(str(tmp_path / "images"), images)
    largest = max(images, key=lambda name: len(images[name]))
    limit = len(images[largest]) - 1
    predict.predict(export_dir, str(tmp_path / "images"), str(tmp_path / "out.csv"), max_image_bytes=limit)
    rows = {row["path"].rsplit("images/", 1)[-1]: row for row in read_csv(str(tmp_path / "out.csv"))}
    assert sorted(rows) == sorted(images)
    assert rows[largest]["error"] == f"too large: more than --max_image_bytes={limit} bytes"
    assert rows[largest]["predicted_class"] == ""
    assert all(row["predicted_class"] for name, row in rows.items() if name != largest)


def test_predict_on_a_gcs_glob(tmp_path, exported, gcs_bucket):
    export_dir, classifier = exported
    model_url = f"{gcs_bucket}/job/model"
    folders.copy_tree(export_dir, model_url)
    images = make_images()
    write_folder(f"{gcs_bucket}/images", images)
    output = f"{gcs_bucket}/predictions/preds.csv"

    predict.predict(model_url, f"{gcs_bucket}/images/sub/*.*", output)

    rows = read_csv(output)
    # The glob has no `**`: only the files directly in sub/.
    check_rows(rows, [f"{gcs_bucket}/images/sub/b.PNG", f"{gcs_bucket}/images/sub/c.jpeg"], images,
               classifier)


def test_predict_on_a_gcs_prefix_and_a_local_glob(tmp_path, exported, gcs_bucket):
    export_dir, classifier = exported
    images = make_images()
    write_folder(f"{gcs_bucket}/images", images)
    output = str(tmp_path / "prefix.csv")
    count = predict.predict(export_dir, f"{gcs_bucket}/images", output, batch_size=4)
    assert count == 6
    locations = [f"{gcs_bucket}/images/{name}" for name in images if name != "notes.txt"]
    check_rows(read_csv(output), locations, images, classifier)

    folder = str(tmp_path / "images")
    write_folder(folder, images)
    count = predict.predict(export_dir, str(tmp_path / "images" / "**" / "*.[bG]*"), output)
    assert count == 2
    assert [row["path"].rsplit("/", 1)[-1] for row in read_csv(output)] == ["d.bmp", "e.GIF"]


def test_no_images_or_missing_input_is_a_user_error(tmp_path, exported):
    export_dir, _ = exported
    write_folder(str(tmp_path / "texts"), {"notes.txt": b"hello"})
    with pytest.raises(UserError, match="no image files"):
        predict.predict(export_dir, str(tmp_path / "texts"), str(tmp_path / "out.csv"))
    with pytest.raises(UserError, match="no image files"):
        predict.predict(export_dir, str(tmp_path / "texts" / "*.jpg"), str(tmp_path / "out.csv"))
    with pytest.raises(UserError, match="input not found"):
        predict.predict(export_dir, str(tmp_path / "nowhere"), str(tmp_path / "out.csv"))
    assert not storage.exists(str(tmp_path / "out.csv"))


def test_predict_with_a_missing_model_fails_with_one_line(tmp_path):
    folder = str(tmp_path / "images")
    write_folder(folder, {"a.jpg": make_images()["a.jpg"]})
    line = assert_fails_as(lambda: predict.predict(str(tmp_path / "no_model"), folder, str(tmp_path / "out.csv")))
    assert line.startswith("error: no exported model at")


def test_predict_takes_every_format_training_takes_and_an_existing_path_with_brackets(tmp_path, exported):
    export_dir, classifier = exported
    rng = np.random.RandomState(1)
    pixels = rng.randint(0, 256, (24, 28, 3), dtype=np.uint8)
    images = {name: encode(pixels, image_format) for name, image_format in
              (("a.webp", "WEBP"), ("b.tiff", "TIFF"), ("c.ico", "ICO"), ("d.ppm", "PPM"))}
    folder = str(tmp_path / "photos [2024]")  # `[2024]` would be a glob character class
    write_folder(folder, images)
    output = str(tmp_path / "preds.csv")
    assert predict.predict(export_dir, folder, output) == 4
    rows = read_csv(output)
    assert [row["error"] for row in rows] == [""] * 4
    # Scored on the bytes training would have stored for the same file (trainer prepare's conversion).
    for row in rows:
        stored = prepare_encode.encode_image(images[row["path"].rsplit("/", 1)[1]])["encoded"]
        assert float(row["prob_dogs"]) == pytest.approx(expected_dog_probability(classifier, stored), abs=1e-4)


def test_csv_cells_never_become_spreadsheet_formulas(tmp_path):
    classifier = model.build_model("tiny", 2, IMAGE_SIZE, weights=None, head="avgpool", dense_units=4)
    export_dir = str(tmp_path / "model")
    classes = ['=HYPERLINK("http://x","y")', "+1"]
    export.export_model(classifier, classes, IMAGE_SIZE, export_dir, backbone="tiny")
    write_folder(str(tmp_path / "images"), {"a.jpg": make_images()["a.jpg"]})
    output = str(tmp_path / "preds.csv")
    predict.predict(export_dir, str(tmp_path / "images"), output)
    row = read_csv(output)[0]
    assert row["predicted_class"] in ("'" + classes[0], "'" + classes[1])
    assert not any(value.startswith(("=", "+", "-", "@")) for value in row.values())


def test_hidden_files_are_left_out_as_prepare_leaves_them_out(tmp_path):
    images = make_images()
    folder = tmp_path / "images"
    write_folder(str(folder), {"a.jpg": images["a.jpg"], "..jpg": images["a.jpg"], ".cache/b.jpg": images["a.jpg"]})
    assert predict.list_images(str(folder)) == [str(folder / "a.jpg")]
    assert predict.list_images(str(folder / "*.jpg")) == [str(folder / "a.jpg")]  # the pattern matches ..jpg too
    assert prepare_encode.is_hidden("..jpg") and prepare_encode.is_hidden(".cache/b.jpg")
    assert not prepare_encode.is_hidden("cats/a.b.jpg")


def test_a_tflite_file_is_refused_in_one_line_and_a_tilde_model_is_home(tmp_path, exported, monkeypatch):
    export_dir, classifier = exported
    images = make_images()
    write_folder(str(tmp_path / "images"), {"a.jpg": images["a.jpg"]})
    assert_fails_as(lambda: predict.predict(str(tmp_path / "model_int8.tflite"), str(tmp_path / "images"),
                                            str(tmp_path / "out.csv")),
                    "is a TensorFlow Lite file", "trainer evaluate --model=FILE.tflite")
    folders.copy_tree(export_dir, str(tmp_path / "home" / "model"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert predict.predict("~/model", str(tmp_path / "images"), str(tmp_path / "out.csv")) == 1
    check_rows(read_csv(str(tmp_path / "out.csv")), [str(tmp_path / "images" / "a.jpg")], images, classifier)
