"""Where prepare's shards are written: a local process pool, or any Apache Beam runner.

`run` writes every shard of the plan not yet committed (trainer.prepare.shards: one shard is the
unit of work, the same function under every runner) and reads every report back, in plan order.
"""

import multiprocessing
import signal

from absl import logging

from trainer.errors import RetryableError, counted
from trainer.infra import beam
from trainer.prepare import shards


def run(output, entries, runner="local", workers=1, pipeline_args=(), on_report=None):
    """Writes every shard not yet committed, on `runner`; returns all reports in plan order.

    Args:
      entries: the stored plan's `(name, digest, offset, length)` per shard (shards.write_plan).
    """
    names = [name for name, *_ in entries]
    done = shards.committed(output, entries)
    jobs = [(output, offset, length) for name, _, offset, length in entries if name not in done]
    for report in done.values():
        if on_report:
            on_report(report)
    if jobs and runner == "local":
        run_local(jobs, workers, on_report)
    elif jobs:
        run_beam(jobs, runner, pipeline_args)
    reports = shards.read_reports(output, names)
    if runner != "local" and on_report:
        for name, report in reports.items():
            if name not in done and report:
                on_report(report)
    missing = [name for name, report in reports.items() if report is None]
    if missing:
        raise RetryableError(f"{len(missing)} shards did not report (first: {missing[0]}); run the same "
                             "command again to write them")
    return [reports[name] for name in names]


def _write_shard_job(job):
    return shards.write_shard(*job)


def _worker_signals():
    # Ctrl-C reaches the whole process group: the parent stops the pool; workers need not print.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The pool ends its idle workers with SIGTERM while they wait on a semaphore: only the default
    # action ends them there. A Python handler runs in the main thread alone, so a SIGTERM landing on
    # another of the worker's threads left it waiting, and prepare hung after its last shard.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run_local(jobs, workers, on_report=None):
    """Writes the shards of `jobs` on up to `workers` processes (in this process for one)."""
    processes = min(workers, len(jobs))
    decoders = max(1, workers // processes)
    jobs = [(*job, decoders) for job in jobs]
    if processes == 1:
        reports = map(_write_shard_job, jobs)
        for report in reports:
            if on_report:
                on_report(report)
        return
    # spawn, not fork: the parent may hold gcsfs's threads, which fork does not carry over safely.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_worker_signals) as pool:
        for report in pool.imap_unordered(_write_shard_job, jobs):
            if on_report:
                on_report(report)


def run_beam(jobs, runner, pipeline_args=()):
    """Writes the shards of `jobs` as an Apache Beam pipeline on `runner`."""
    logging.info("writing %s with Apache Beam's %s", counted(len(jobs), "shard"), runner)

    def build(pipeline):
        import apache_beam

        _ = (pipeline
             | "Shards" >> apache_beam.Create(jobs)
             | "Spread" >> apache_beam.Reshuffle()  # one shard per worker, whatever Create's bundles
             | "WriteShard" >> apache_beam.MapTuple(shards.write_shard))

    beam.run(build, runner, pipeline_args)
