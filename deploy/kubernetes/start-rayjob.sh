#!/bin/sh
# Run by the CronJob: create a RayJob from the manifest $1, wait until KubeRay reports it
# finished, delete finished RayJobs beyond the newest $KEEP_RAYJOBS, and exit 0 only if the
# Ray job SUCCEEDED (so the CronJob's Job history shows failed runs).
set -eu
manifest="$1"
keep="${KEEP_RAYJOBS:-5}"
poll="${POLL_SECONDS:-60}"
name="$(kubectl create -f "$manifest" -o name)"
echo "created $name"
while :; do
  # a failed look-up (API server restart...) is retried, it does not end the wait
  deployment="$(kubectl get "$name" -o jsonpath='{.status.jobDeploymentStatus}' || true)"
  case "$deployment" in
    Complete | Failed) break ;;
  esac
  sleep "$poll"
done
status="$(kubectl get "$name" -o jsonpath='{.status.jobStatus}' || true)"
echo "$name: deployment $deployment, Ray job $status"
old="$(kubectl get rayjobs -l app.kubernetes.io/name=refseg-label \
  --sort-by=.metadata.creationTimestamp -o name || true)"
count="$(printf '%s\n' "$old" | grep -c . || true)"
if [ "$count" -gt "$keep" ]; then
  printf '%s\n' "$old" | head -n "$((count - keep))" | while read -r job; do
    kubectl delete "$job" --wait=false || true
  done
fi
[ "$status" = SUCCEEDED ]
