"""Errors the command line turns into a one-line message and a documented exit code.

Exit codes (the Kubernetes manifests' podFailurePolicy is built on them):
  0   success (also: the job was already complete)
  1   bad input: flags, data, weights, manifest. Retrying cannot help.
  75  retryable: preempted (SIGTERM) after a backup was committed, storage unreachable after
      retries, or a peer worker lost. Restarting the same command resumes.
  70  an unexpected internal error (a bug): logged with its traceback.
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 1
EXIT_SOFTWARE = 70
EXIT_RETRYABLE = 75


class UserError(ValueError):
    """Something the user can fix: a bad flag value, a missing path, a corrupt dataset."""


class RetryableError(RuntimeError):
    """A failure that a restart of the same command can get past (preemption, storage outage)."""
