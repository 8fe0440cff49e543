"""The one way times are written in the files of this project: UTC, to the second, `Z` suffix.

dataset.json's `created`, job_dir's STARTED, DONE and COMPLETE markers, promote's CLAIM and LATEST
all use `now_text()`; reading accepts any ISO 8601 time with a zone (files written by older
versions carry `+00:00`).
"""

import datetime

FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def now():
    """The current time, UTC, timezone-aware."""
    return datetime.datetime.now(datetime.timezone.utc)


def now_text():
    return now().strftime(FORMAT)


def parse(text):
    """An aware datetime from an ISO 8601 time with a zone.

    Raises:
      ValueError: not such a time (a time without a zone is refused: its moment is unknown).
    """
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError(f"{text.strip()!r} has no time zone")
    return moment
