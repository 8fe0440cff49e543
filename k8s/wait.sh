#!/usr/bin/env bash
# Waits for a run (a Job or a JobSet) to finish: exit 0 when it completed, 1 when it failed or the
# timeout passed. `kubectl wait` takes one condition, so two run side by side and the first wins.
#   usage: k8s/wait.sh RUN_NAME [TIMEOUT]     (KUBECTL overrides the kubectl command)
set -euo pipefail
name=${1:?usage: k8s/wait.sh RUN_NAME [TIMEOUT]}
timeout=${2:-6h}
kubectl=${KUBECTL:-kubectl}

if $kubectl get "jobset/$name" >/dev/null 2>&1; then
  target=jobset/$name complete=Completed
else
  target=job/$name complete=Complete
fi
$kubectl wait --for="condition=$complete" --timeout="$timeout" "$target" & completed=$!
$kubectl wait --for=condition=Failed --timeout="$timeout" "$target" >/dev/null & failed=$!
status=0
wait -n -p finished "$completed" "$failed" || status=$?
kill "$completed" "$failed" 2>/dev/null || true
if [[ $finished == "$completed" && $status == 0 ]]; then
  exit 0
fi
echo "$target did not complete (failed, or still running after $timeout): make logs RUN=$name" >&2
$kubectl get "$target" -o wide >&2 || true
exit 1
