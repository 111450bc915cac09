#!/usr/bin/env bash
# Runs a command and starts it again whenever it exits, so that a crashed or killed model worker is replaced
# without a person: scripts/supervise.sh COMMAND... (scripts/start.sh runs the worker this way).
# The first restart, and one after a run of a minute or more, is at once; after shorter runs the pause doubles
# (1, 2, 4 .. 60 s): a worker that cannot start does not spin. Each new run gets MEDSAM2HITL_REPLACES_PID, the
# pid of the run that exited: that process is gone for sure, so the new worker can declare it dead at once
# instead of waiting for its heartbeat to lapse. SIGTERM or SIGINT stops the command, then this loop.
set -uo pipefail
delay=0
child=
stop() {
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child"
  exit 0
}
trap stop TERM INT
while true; do
  started=$SECONDS
  "$@" &
  child=$!
  wait "$child"
  status=$?
  export MEDSAM2HITL_REPLACES_PID=$child
  child=
  if (( SECONDS - started >= 60 )); then delay=0; fi
  echo "supervise: '$1' exited with status $status after $(( SECONDS - started )) s; starting it again in $delay s" >&2
  sleep "$delay" &
  child=$!
  wait "$child"
  child=
  delay=$(( delay == 0 ? 1 : (delay * 2 > 60 ? 60 : delay * 2) ))
done
