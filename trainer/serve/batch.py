"""`trainer predict` on an Apache Beam runner: the shards of trainer.serve.predict (trainer.serve.shards) scored with
Beam's RunInference.

    shards (output, offset, length) -> Reshuffle -> one element per image (shard, index, location)
      -> RunInference(ImageFileHandler): the export loaded once per worker, images read and
         scored in batches of `batch_size`
      -> GroupByKey(shard) -> commit_shard: the rows in order, written whole, then the marker

The grouping gives every shard exactly its images' results once, whatever bundles a runner
retried, and `commit_shard` refuses to write a shard whose results are not one per image. The
rows are those of the local runner: the same reads, signature and formatting.
"""

import apache_beam as beam
from absl import logging
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from trainer.errors import counted
from trainer.infra import beam as beam_runs
from trainer.serve import shards


class ImageFileHandler(ModelHandler):
    """RunInference's handler: examples are image locations, predictions `(probabilities, error)`."""

    def __init__(self, model_url, max_image_bytes, batch_size):
        self._model_url, self._max_image_bytes, self._batch_size = model_url, max_image_bytes, batch_size

    def load_model(self):
        return shards.Scorer(self._model_url, self._max_image_bytes)

    def run_inference(self, batch, model, inference_args=None):
        locations = [location for _, location in batch]
        return [PredictionResult(example, scored) for example, scored in zip(batch, model.score(locations),
                                                                              strict=True)]

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": self._batch_size}


def _images(job):
    output, _, offset, length = job
    task = shards.read_task(output, offset, length)
    return [(task["name"], (index, location)) for index, location in enumerate(task["locations"])]


def run(output, entries, model_url, max_image_bytes, batch_size, runner, pipeline_args=()):
    """Scores and commits the shards of `entries` (`(name, digest, offset, length)`) on `runner`."""
    class_names = shards.read_class_names(model_url)
    jobs = {name: (output, digest, offset, length) for name, digest, offset, length in entries}
    logging.info("scoring %s with Apache Beam's %s", counted(len(entries), "shard"), runner)

    def commit(named):
        name, results = named
        _, digest, offset, length = jobs[name]
        return shards.commit_shard(output, shards.read_task(output, offset, length), digest,
                                    [(result.example[0], *result.inference) for result in results], class_names)

    def build(pipeline):
        _ = (pipeline
             | "Shards" >> beam.Create(list(jobs.values()))
             | "Spread" >> beam.Reshuffle()
             | "Images" >> beam.FlatMap(_images)
             | "Score" >> RunInference(KeyedModelHandler(ImageFileHandler(model_url, max_image_bytes, batch_size)))
             | "ByShard" >> beam.GroupByKey()
             | "Commit" >> beam.Map(commit))

    beam_runs.run(build, runner, pipeline_args)
