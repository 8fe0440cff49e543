"""Errors the command line turns into a one-line message and a documented exit code.

Exit codes (the Kubernetes manifests' podFailurePolicy is built on them):
  0   success (also: the job was already complete)
  1   bad input: flags, data, weights, manifest. Retrying cannot help.
  75  retryable: preempted (SIGTERM) after a backup was committed, storage unreachable after
      retries, or a peer worker lost. Restarting the same command resumes.
  70  an unexpected internal error (a bug): logged with its traceback.

Errors raised inside a tf.data pipeline (in a `tf.py_function`) reach the caller wrapped in a
TensorFlow OpError whose message holds the Python traceback text, whose last line reads
`UserError: <message>` or `RetryableError: <message>`. `from_tensorflow` is the one place that
recovers the original error from that text; nothing else parses TensorFlow's messages for it.
This module imports nothing heavy: the command line uses it before TensorFlow is loaded.
"""

import os
import re
import sys
import threading

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_SOFTWARE = 70
EXIT_RETRYABLE = 75


class UserError(ValueError):
    """Something the user can fix: a bad flag value, a missing path, a corrupt dataset."""


class RetryableError(RuntimeError):
    """A failure that a restart of the same command can get past (preemption, storage outage)."""


# Lines of a TensorFlow error message that say where, not what.
_TENSORFLOW_NOISE = ("Graph execution error", "Detected at node", "<stack traces")


def counted(count, noun, plural=None):
    """`1 shard`, `2 shards`, `0 classes`: a count and its noun, in the number the count needs."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural or (noun + 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else noun + 's')}"


def first_line(error, limit=200):
    """The first line of an error that says what went wrong, at most `limit` characters.

    TensorFlow's messages run to dozens of lines: "Graph execution error:", "Detected at node ...",
    indented stack frames, and `{{function_node ...}}` / `[[{{node ...}}]]` / `[Op:...]` decorations
    around the decoder's or kernel's own words; those are left out. Falls back to the error's type
    name for an error without a message.
    """
    message = getattr(error, "message", None) or str(error)
    for line in message.splitlines():
        if not line.strip() or line[0] in " \t" or line.startswith(_TENSORFLOW_NOISE):
            continue
        line = re.sub(r"\{\{.*?\}\}", "", line).split(" [[")[0].split("[Op:")[0].strip()
        if line:
            return line[:limit]
    return type(error).__name__


def from_tensorflow(error):
    """The UserError or RetryableError that a py_function raised inside a tf.data pipeline.

    Args:
      error: any exception; typically a `tf.errors.OpError` caught around dataset iteration or
        `model.fit`.

    Returns:
      A new UserError/RetryableError with the original one-line message, or None when `error`
      does not carry one (a genuine TensorFlow failure, or a bug).
    """
    message = getattr(error, "message", None) or str(error)
    for kind in (UserError, RetryableError):
        marker = f"{kind.__name__}: "
        if marker in message:
            return kind(message.split(marker, 1)[1].split("\n", 1)[0].strip())
    return None


_DISK_FULL = ("No space left on device", "Disk quota exceeded", "File too large")


def disk_full(error, location=None):
    """A one-line message when `error` (an OSError, or TensorFlow's wrapping of one) means a full
    disk, else None. A full disk is the environment's problem, not a bug: exit 1 with this.
    `location` names what was being written when the error does not."""
    import errno

    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        target = error.filename or location
        where = f" writing {target}" if target else ""
        return f"no space left on device{where} ({os.strerror(error.errno)}): free space, or give the job a " \
               "larger disk (scratch files go to TMPDIR)"
    message = getattr(error, "message", None) or str(error)
    if any(marker in message for marker in _DISK_FULL):
        return f"no space left on device: {first_line(error)}: free space, or give the job a larger disk " \
               "(scratch files go to TMPDIR)"
    return None


def exit_status(error):
    """The exit status and one-line message that end a command after `error`.

    Args:
      error: any exception a command raised.

    Returns:
      `(code, message)`: EXIT_BAD_INPUT for a UserError, a usage error or a full disk;
      EXIT_RETRYABLE for a RetryableError; a UserError/RetryableError that TensorFlow wrapped
      inside a tf.data pipeline as the original would be; EXIT_SOFTWARE for anything else (a bug:
      the caller logs its traceback).
    """
    from absl import app

    if isinstance(error, (UserError, app.UsageError)):
        return EXIT_BAD_INPUT, f"error: {error}"
    if isinstance(error, RetryableError):
        return EXIT_RETRYABLE, f"retryable error: {error}"
    if full := disk_full(error):
        return EXIT_BAD_INPUT, f"error: {full}"
    translated = from_tensorflow(error) if "tensorflow" in sys.modules else None
    if translated is not None:  # damaged data found inside tf.data (a named shard or image)
        return exit_status(translated)
    return EXIT_SOFTWARE, "internal error (the traceback is above)"


def exit_process(code, message=None):
    """Prints the one-line reason (if any) and ends the process at once, from any thread.

    With live tf.data iterators (the repeating training input, a failed pipeline), normal
    interpreter shutdown can deadlock: destroying an iterator waits for its threads while one of
    them waits for the GIL to run a py_function. Every output is written and closed by now (files
    are written whole or not at all), so nothing is lost by skipping the shutdown.
    """
    import logging

    if message:
        sys.stderr.write(message + "\n")
    if "tensorflow" not in sys.modules and threading.current_thread() is threading.main_thread():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def exit_after_signal(signums, seconds, code, message):
    """Once one of `signums` arrives, ends the process with `code` `seconds` later unless it ended
    by then; `message` may name the signal as `{signal}` (SIGTERM, SIGINT).

    The bound on how long a SIGTERM (or a Ctrl-C) may take when the main thread is stuck in a
    stalled storage call or a TensorFlow op: Python runs a signal's handler in the main thread only
    when that returns, but the interpreter's C-level handler writes the signal to the wakeup fd at
    once, and a thread waiting on it starts the countdown. The caller installs the Python handlers
    (without one a signal is not routed here). Call from the main thread, once per process.
    """
    import signal

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def watch():
        while not (arrived := [signum for signum in os.read(read_end, 64) if signum in signums]):
            pass
        timer = threading.Timer(seconds, exit_process, args=(code, message.format(
            signal=signal.Signals(arrived[0]).name)))
        timer.daemon = True
        timer.start()

    threading.Thread(target=watch, daemon=True, name="signals").start()
