"""Label files: the Vertex AI image-classification import formats, for `trainer prepare --labels`.

CSV, one image per row (https://cloud.google.com/vertex-ai/docs/image-data/classification/prepare-data):

    [ML_USE,]IMAGE_URI,LABEL          e.g.  training,gs://bucket/flowers/1.jpg,daisy
                                            gs://bucket/flowers/2.jpg,tulip

JSON Lines, one object per line:

    {"imageGcsUri": "gs://bucket/flowers/1.jpg",
     "classificationAnnotation": {"displayName": "daisy"},
     "dataItemResourceLabels": {"aiplatform.googleapis.com/ml_use": "training"}}

ML_USE is training, validation, test or unassigned (any case); a row without one, or unassigned,
gets the stable hash split. IMAGE_URI is any location fsspec reaches (gs://, another bucket, a
local path); a relative one is relative to the label file's folder. Every bad row (an unknown
ML_USE, an empty label or URI, a malformed line) is reported with its line number, and an image
with more than one label is refused: this trainer gives each image one class.
"""

import csv
import io
import json
from concurrent import futures

from trainer.errors import RetryableError, UserError
from trainer.infra import storage

ML_USE = {"training": "train", "validation": "val", "test": "test", "unassigned": None}
VERTEX_ML_USE_KEY = "aiplatform.googleapis.com/ml_use"
PROBLEMS_SHOWN = 5
# A class name longer than this is a mistake (a pasted document, a column shifted): it would be
# written into every log line, record and picture that names the class.
MAX_LABEL_CHARACTERS = 200
HTTP_SCHEMES = ("http://", "https://")
EXISTS_THREADS = 16  # existence checks at once (one request each on an object store)

Row = tuple  # (line number, image location, label, split or None)


def read_label_file(url, allow_http=False):
    """The rows of a Vertex CSV or JSONL label file: [(line, location, label, split or None)].

    Args:
      url: the label file.
      allow_http: whether rows may name http(s) URLs. Off by default: each such row is a request
        from wherever prepare runs (inside a cluster's network), to any address the file names.

    Raises:
      UserError: the file is missing, or has bad rows (each named with its line number), or gives
        one image several labels.
    """
    problems = []
    located = list(label_rows(url, allow_http, problems))
    problems += _multi_label(located)
    if problems:
        problems += unreadable_rows(located)
    check_problems(url, problems, bool(located))
    return located


def label_rows(url, allow_http, problems):
    """Yields the rows of a label file as it is read (one line in memory at a time), appending a
    problem (`line N: ...`) to `problems` for each bad row instead.

    Raises:
      UserError: the file is missing or not UTF-8 text.
    """
    folder = storage.dirname(url)
    jsonl = url.lower().endswith((".jsonl", ".json"))
    try:
        with storage.open_file(url, "rb") as handle:
            text = io.TextIOWrapper(handle, encoding="utf-8", newline="")
            for line, uri, label, split in (_parse_jsonl if jsonl else _parse_csv)(text, problems):
                if uri.lower().startswith(HTTP_SCHEMES) and not allow_http:
                    problems.append(f"line {line}: {uri[:100]} is an http(s) URL, read only with --allow_http")
                    continue
                location = uri if "://" in uri or uri.startswith("/") else storage.join(folder, *uri.split("/"))
                yield line, location, label, split
    except FileNotFoundError:
        raise UserError(f"label file not found: {url}") from None
    except UnicodeDecodeError as error:
        raise UserError(f"label file {url} is not UTF-8 text: {error}") from None


def check_problems(url, problems, any_rows):
    """Raises UserError naming every bad row (the first PROBLEMS_SHOWN by line, and the count), or
    when the file lists no image at all.

    Callers add `unreadable_rows` to a file's problems when it has some: every bad row is then
    reported at once, with the ones that name no readable image (which prepare would otherwise
    report only once the others are fixed)."""
    if problems:
        problems = sorted(problems, key=lambda problem: int(problem.split()[1][:-1]))
        shown = "; ".join(problems[:PROBLEMS_SHOWN])
        more = f" (and {len(problems) - PROBLEMS_SHOWN} more)" if len(problems) > PROBLEMS_SHOWN else ""
        raise UserError(f"{url}: {len(problems)} bad rows: {shown}{more}")
    if not any_rows:
        raise UserError(f"{url} lists no images")


def unreadable_rows(rows):
    """A problem for every row whose image is missing or not a regular file (never opened)."""

    def problem(row):
        line, location, _, _ = row
        try:
            if not storage.is_url(location):
                storage.check_regular_file(location)
            if not storage.exists(location):
                return f"line {line}: image not found: {location}"
        except storage.NotRegularFile:
            return f"line {line}: not a regular file (a device, a FIFO or a socket): {location}"
        except (RetryableError, UserError):
            return None  # the store cannot say now: the rows already found are reported
        return None

    found = []
    with futures.ThreadPoolExecutor(EXISTS_THREADS) as pool:
        for start in range(0, len(rows), 10_000):  # a bounded number of checks queued at once
            found += [problem for problem in pool.map(problem, rows[start:start + 10_000]) if problem]
    return found


def _split_of(value, line):
    """(split or None, problem or None) for an ML_USE value."""
    key = value.strip().lower()
    if key not in ML_USE:
        return None, f"line {line}: unknown ML_USE {value!r} (training, validation, test or unassigned)"
    return ML_USE[key], None


def _parse_csv(text, problems):
    for line, fields in enumerate(csv.reader(text), start=1):
        fields = [field.strip() for field in fields]
        if not any(fields):
            continue
        if len(fields) == 2:
            (uri, label), split = fields, None
        elif len(fields) == 3:
            ml_use, uri, label = fields
            split, problem = _split_of(ml_use, line)
            if problem:
                problems.append(problem)
                continue
        else:
            problems.append(f"line {line}: {len(fields)} fields, expected [ML_USE,]IMAGE_URI,LABEL")
            continue
        yield from _checked_row(problems, line, uri, label, split, "image URI", "label")


def _checked_row(problems, line, uri, label, split, uri_field, label_field):
    """Yields the row, or appends the problem with it (no URI, an empty label)."""
    if not uri:
        problems.append(f"line {line}: no {uri_field}")
    elif not label:
        problems.append(f"line {line}: empty {label_field} for {uri}")
    elif len(label) > MAX_LABEL_CHARACTERS:
        problems.append(f"line {line}: a {label_field} of {len(label)} characters (at most {MAX_LABEL_CHARACTERS}): "
                        f"{label[:40]}...")
    else:
        yield line, uri, label, split


def _parse_jsonl(text, problems):
    for line, raw in enumerate(text, start=1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except ValueError as error:
            problems.append(f"line {line}: not JSON ({error})")
            continue
        if not isinstance(item, dict):
            problems.append(f"line {line}: not a JSON object")
            continue
        uri = str(item.get("imageGcsUri") or "").strip()
        if "classificationAnnotations" in item:  # Vertex's multi-label form
            problems.append(f"line {line}: classificationAnnotations (multi-label) for {uri or 'an image'}: "
                            "this trainer gives each image one class")
            continue
        annotation = item.get("classificationAnnotation") or {}
        label = str(annotation.get("displayName") or "").strip() if isinstance(annotation, dict) else ""
        ml_use = (item.get("dataItemResourceLabels") or {}).get(VERTEX_ML_USE_KEY)
        split, problem = (None, None) if ml_use is None else _split_of(str(ml_use), line)
        if problem:
            problems.append(problem)
        else:
            yield from _checked_row(problems, line, uri, label, split, "imageGcsUri",
                                    "classificationAnnotation.displayName")


def _multi_label(rows):
    """A problem for every image that a later row gives another label (or lists again)."""
    first, problems = {}, []
    for line, location, label, _ in rows:
        if location not in first:
            first[location] = (line, label)
            continue
        problems.append(repeat_problem(line, location, label, *first[location]))
    return problems


def repeat_problem(line, location, label, earlier, earlier_label):
    """The problem of a row naming an image an earlier row named (with another label, or again)."""
    if label != earlier_label:
        return (f"line {line}: a second label {label!r} for {location} (line {earlier}: {earlier_label!r}): "
                "multi-label images are not supported, one class per image")
    return f"line {line}: {location} again (as on line {earlier})"
