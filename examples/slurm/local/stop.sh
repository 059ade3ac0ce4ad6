#!/usr/bin/env bash
# Stop a cluster started by examples/slurm/local/start.sh: cancel its jobs, stop slurmd(s), slurmctld and munged.
#   examples/slurm/local/stop.sh DIR      (or with SLURM_CONF=DIR/slurm.conf set: examples/slurm/local/stop.sh)
# Every daemon is stopped by the pid in its pid file under DIR (SIGTERM, then SIGKILL after SLURM_LOCAL_TIMEOUT
# seconds, 30 by default). DIR keeps the logs; remove it yourself. Exits non-zero if a process could not be stopped.
set -uo pipefail

DIR=${1:-${SLURM_CONF:+$(dirname "$SLURM_CONF")}}
[[ -n $DIR && -d $DIR ]] || { echo "usage: stop.sh DIR (the directory start.sh printed)" >&2; exit 2; }
DIR=$(cd "$DIR" && pwd)
[[ -f $DIR/slurm.conf ]] || { echo "stop.sh: $DIR has no slurm.conf: not a directory start.sh made" >&2; exit 2; }
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-30}
export SLURM_CONF=$DIR/slurm.conf

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if alive "$DIR/slurmctld.pid"; then
  # Jobs first: a job step outlives its slurmd, so stopping the daemons alone would leave the job's processes.
  jobs=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')
  if [[ -n ${jobs// /} ]]; then
    echo "stop.sh: cancelling jobs $jobs"
    # shellcheck disable=SC2086
    scancel $jobs
    deadline=$((SECONDS + TIMEOUT))
    while [[ -n $(squeue -h -o %A 2>/dev/null) ]] && ((SECONDS < deadline)); do sleep 0.5; done
    [[ -z $(squeue -h -o %A 2>/dev/null) ]] || echo "stop.sh: jobs still listed after ${TIMEOUT}s: $(squeue -h)" >&2
  fi
  scontrol shutdown >/dev/null 2>&1 || true  # slurmctld and every slurmd
fi

failed=0
for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
  alive "$pidfile" || continue
  pid=$(cat "$pidfile")
  kill -TERM "$pid" 2>/dev/null
  deadline=$((SECONDS + TIMEOUT))
  while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "stop.sh: $(basename "$pidfile" .pid) (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null
    sleep 1
    kill -0 "$pid" 2>/dev/null && { echo "stop.sh: could not stop pid $pid" >&2; failed=1; }
  fi
done
# A daemon that exited removes its pid file only sometimes; a stale one would look like a running cluster.
for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
  [[ -f $pidfile ]] && ! alive "$pidfile" && rm -f "$pidfile"
done
((failed)) || echo "stop.sh: stopped the cluster in $DIR (logs kept in $DIR/log)"
exit "$failed"
