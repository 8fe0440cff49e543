"""The frozen-feature cache: training the head on cached base outputs is the same model."""

import numpy as np
import pytest
from helpers import prepare_stripes

from trainer.data import pipeline
from trainer.formats import jobdir, manifest
from trainer.infra import storage
from trainer.train import featurecache, model


@pytest.fixture(scope="module")
def manifest_url(tmp_path_factory):
    return prepare_stripes(tmp_path_factory.mktemp("cache"), per_class=20)


def tiny_setup(manifest_url, tmp_path):
    """The job_dir, an untrained tiny classifier, and the val split's count."""
    classifier = model.build_model("tiny", 2, 32, weights=None, dense_units=16)
    count = manifest.count_examples(manifest.load_manifest(manifest_url), "val")
    return jobdir.JobDir(str(tmp_path / "job")), classifier, count


def extract(classifier, job, manifest_url, count, scratch):
    dataset_args = {"manifest_url": manifest_url, "image_size": 32, "batch_size": 8}
    return featurecache.extract_features(classifier.get_layer("base"), job, dataset_args, "val", scratch)


def test_head_on_cached_features_predicts_what_the_full_model_predicts(manifest_url, tmp_path):
    job, classifier, count = tiny_setup(manifest_url, tmp_path)
    paths = extract(classifier, job, manifest_url, count, str(tmp_path / "scratch"))
    cached = featurecache.cached_dataset(paths, batch_size=8, training=False, seed=0)
    from_cache = classifier.get_layer("head").predict(cached, verbose=0)
    images = pipeline.make_dataset(manifest_url, "val", 32, 8, training=False)
    from_images = classifier.predict(images, verbose=0)
    assert from_cache.shape == from_images.shape == (count, 1)
    np.testing.assert_allclose(from_cache, from_images, rtol=1e-5, atol=1e-6)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels in images])
    assert np.array_equal(np.load(paths[1]), labels)  # the cache keeps the examples' order


def test_cache_is_committed_to_job_dir_and_reused(manifest_url, tmp_path):
    job, classifier, count = tiny_setup(manifest_url, tmp_path)
    first = extract(classifier, job, manifest_url, count, str(tmp_path / "node1"))
    assert storage.exists(str(tmp_path / "job" / "features" / "val" / "part-0-of-1" / "COMPLETE"))
    # A fresh node (other scratch) with another base must get the committed features, not recompute.
    other = model.build_model("tiny", 2, 32, weights=None, dense_units=16)
    second = extract(other, job, manifest_url, count, str(tmp_path / "node2"))
    np.testing.assert_array_equal(np.load(first[0]), np.load(second[0]))


def test_in_memory_and_memory_mapped_parts_read_the_same_batches(manifest_url, tmp_path):
    job, classifier, count = tiny_setup(manifest_url, tmp_path)
    paths = extract(classifier, job, manifest_url, count, str(tmp_path / "scratch"))
    for training in (False, True):
        batches = []
        for limit in (featurecache.IN_MEMORY_BYTES, 0):  # 0: every part is read memory-mapped
            dataset = featurecache.cached_dataset(paths, batch_size=4, training=training, seed=3, in_memory_bytes=limit)
            batches.append([(x.numpy(), y.numpy()) for x, y in dataset.take(6)])
        for (x_memory, y_memory), (x_mapped, y_mapped) in zip(*batches, strict=True):
            np.testing.assert_array_equal(x_memory, x_mapped)
            np.testing.assert_array_equal(y_memory, y_mapped)
