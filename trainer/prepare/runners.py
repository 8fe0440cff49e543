"""Where prepare's shards are written: a local process pool, or any Apache Beam runner.

`run` writes every shard of the plan not yet committed (trainer.prepare.shards: one shard is the
unit of work, the same function under every runner) and reads every report back, in plan order.
"""

import json
import multiprocessing
import re
import signal

from absl import logging

from trainer.errors import RetryableError, UserError, counted, first_line
from trainer.prepare import shards


def run(output, lines, runner="local", workers=1, pipeline_args=(), on_report=None):
    """Writes every shard not yet committed, on `runner`; returns all reports in plan order."""
    names = [json.loads(line)["name"] for line in lines]
    done = shards.committed(output, names, lines)
    jobs = [job for name, job in zip(names, shards.write_plan(output, lines), strict=True) if name not in done]
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


def _ignore_interrupts():
    # Ctrl-C reaches the whole process group: the parent stops the pool; workers need not print.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
    with context.Pool(processes, initializer=_ignore_interrupts) as pool:
        for report in pool.imap_unordered(_write_shard_job, jobs):
            if on_report:
                on_report(report)


def beam_options(runner, pipeline_args):
    """Beam's PipelineOptions for `runner`; raises UserError for arguments Beam does not know."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise UserError(f"--runner={runner} needs Apache Beam: pip install 'image-transfer-trainer[beam]' "
                        "(or use --runner=local)") from None
    options = PipelineOptions(list(pipeline_args), runner=runner)
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    if unknown:
        raise UserError(f"unknown Beam pipeline option --{sorted(unknown)[0]} (the arguments after --)")
    return options


_STEP_NOTE = re.compile(r" \[while running '[^']*'\]")


def run_beam(jobs, runner, pipeline_args=()):
    """Writes the shards of `jobs` as an Apache Beam pipeline on `runner`."""
    options = beam_options(runner, pipeline_args)
    import logging as std_logging

    import apache_beam as beam

    # Beam's INFO lines are its internals (state caches, bundle sizes); a Dataflow launcher's job
    # URL and state changes are the ones a user watches.
    std_logging.getLogger("apache_beam").setLevel(std_logging.WARNING)
    std_logging.getLogger("apache_beam.runners.dataflow").setLevel(std_logging.INFO)
    logging.info("writing %s with Apache Beam's %s", counted(len(jobs), "shard"), runner)
    try:
        with beam.Pipeline(options=options) as pipeline:
            _ = (pipeline
                 | "Shards" >> beam.Create(jobs)
                 | "Spread" >> beam.Reshuffle()  # one shard per worker, whatever Create's bundles
                 | "WriteShard" >> beam.MapTuple(shards.write_shard))
    except (UserError, RetryableError) as error:
        raise type(error)(_STEP_NOTE.sub("", str(error))) from None
    except Exception as error:  # the runner's own failure: a bad option, a failed Dataflow job
        raise UserError(f"the Beam pipeline failed on {runner}: {_STEP_NOTE.sub('', first_line(error))}") from None
