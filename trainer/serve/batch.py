"""`trainer predict` on an Apache Beam runner: the shards of trainer.serve.predict scored with
Beam's RunInference, each committed as soon as it is scored.

    shards (output, digest, offset, length) -> Reshuffle (spread over workers)
      -> RunInference(ShardHandler): the export loaded once per worker (RunInference shares it
         between threads), each shard's images read a batch ahead and scored `batch_size` at a time
      -> commit_shard: the rows in order, written whole, then the marker

A shard is the element, not an image: a shard's rows never wait for another shard's, so a job
that fails or is cancelled keeps every shard it finished, and the rerun writes only the rest
(there is no grouping step, which in a batch pipeline would hold every row until the last image).
A retried bundle writes the same bytes again. The rows are those of the local runner: the same
reads, signature and formatting (trainer.serve.shards).
"""

import apache_beam as beam
from absl import logging
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from trainer.errors import counted
from trainer.infra import beam as beam_runs
from trainer.serve import shards


class ShardHandler(ModelHandler):
    """RunInference's handler: an example is one shard's job, its inference the shard's results."""

    def __init__(self, model_url, max_image_bytes, batch_size):
        self._model_url, self._max_image_bytes, self._batch_size = model_url, max_image_bytes, batch_size

    def load_model(self):
        return shards.Scorer(self._model_url, self._max_image_bytes)

    def run_inference(self, batch, model, inference_args=None):
        for job in batch:
            output, _, offset, length = job
            task = shards.read_task(output, offset, length)
            yield PredictionResult(job, list(model.score_all(task["locations"], self._batch_size)))

    def batch_elements_kwargs(self):
        return {"min_batch_size": 1, "max_batch_size": 1}  # a shard is already a batch of batches


def run(output, entries, model_url, max_image_bytes, batch_size, runner, pipeline_args=()):
    """Scores and commits the shards of `entries` (`(name, digest, offset, length)`) on `runner`."""
    class_names = shards.read_class_names(model_url)
    logging.info("scoring %s with Apache Beam's %s", counted(len(entries), "shard"), runner)

    def commit(result):
        output_, digest, offset, length = result.example
        return shards.commit_shard(output_, shards.read_task(output_, offset, length), digest, result.inference,
                                   class_names)

    def build(pipeline):
        _ = (pipeline
             | "Shards" >> beam.Create([(output, digest, offset, length) for _, digest, offset, length in entries])
             | "Spread" >> beam.Reshuffle()
             | "Score" >> RunInference(ShardHandler(model_url, max_image_bytes, batch_size))
             | "Commit" >> beam.Map(commit))

    beam_runs.run(build, runner, pipeline_args)
