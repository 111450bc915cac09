#!/usr/bin/env bash
# Runs a command and starts it again whenever it exits, so that a crashed or killed model worker is replaced
# without a person: scripts/supervise.sh COMMAND... (scripts/start.sh runs the worker this way).
# After a run shorter than a minute the pause before the next start doubles (1, 2, 4 .. 60 s): a worker that
# cannot start does not spin. SIGTERM or SIGINT stops the command, then this loop.
set -uo pipefail
delay=1
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
  child=
  if (( SECONDS - started >= 60 )); then delay=1; fi
  echo "supervise: '$1' exited with status $status after $(( SECONDS - started )) s; starting it again in $delay s" >&2
  sleep "$delay" &
  child=$!
  wait "$child"
  child=
  delay=$(( delay * 2 > 60 ? 60 : delay * 2 ))
done
