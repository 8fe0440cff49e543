"""Apache Beam, for the commands that run on any Beam runner (`trainer prepare`, `trainer predict`):
the pipeline options after a lone `--`, checked before any work, and a pipeline run whose failures
end as the commands' one-line errors."""

import re

from trainer.errors import RetryableError, UserError, first_line

_STEP_NOTE = re.compile(r" \[while running '[^']*'\]")


def options(runner, pipeline_args):
    """Beam's PipelineOptions for `runner`; raises UserError for arguments Beam does not know."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise UserError(f"--runner={runner} needs Apache Beam: pip install 'image-transfer-trainer[beam]' "
                        "(or use --runner=local)") from None
    parsed = PipelineOptions(list(pipeline_args), runner=runner)
    unknown = set(parsed.get_all_options(retain_unknown_options=True)) - set(parsed.get_all_options())
    if unknown:
        raise UserError(f"unknown Beam pipeline option --{sorted(unknown)[0]} (the arguments after --)")
    return parsed


def run(build, runner, pipeline_args=()):
    """Builds (`build(pipeline)`) and runs a pipeline on `runner`, waiting for it to finish.

    Raises:
      UserError / RetryableError: a step raised one (its message without Beam's step note), or
        the runner failed (a bad option, a failed Dataflow job).
    """
    parsed = options(runner, pipeline_args)
    import logging as std_logging

    import apache_beam as beam

    # Beam's INFO lines are its internals (state caches, bundle sizes); a Dataflow launcher's job
    # URL and state changes are the ones a user watches.
    std_logging.getLogger("apache_beam").setLevel(std_logging.WARNING)
    std_logging.getLogger("apache_beam.runners.dataflow").setLevel(std_logging.INFO)
    try:
        with beam.Pipeline(options=parsed) as pipeline:
            build(pipeline)
    except (UserError, RetryableError) as error:
        raise type(error)(_STEP_NOTE.sub("", str(error))) from None
    except Exception as error:  # the runner's own failure: a bad option, a failed Dataflow job
        raise UserError(f"the Beam pipeline failed on {runner}: {_STEP_NOTE.sub('', first_line(error))}") from None
