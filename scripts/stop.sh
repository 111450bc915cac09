#!/usr/bin/env bash
# Stops what scripts/start.sh started: scripts/stop.sh [redis|api|celery|web|gradio]... (default: all). Only processes
# whose PID file start.sh wrote are stopped; a Redis that was already running is left alone. Stopping 'celery'
# stops its supervisor (scripts/supervise.sh), which stops the worker and does not start it again.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${MEDSAM2HITL_RUN_DIR:-run}
parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(web api celery redis)
for part in "${parts[@]}"; do
  [ "$part" = worker ] && part=celery
  [ "$part" = gradio ] && part=web
  case $part in redis|api|celery|web) ;; *) echo "unknown part '$part': use redis, api, celery or web (gradio)" >&2; exit 2 ;; esac
  pidfile=$run/pids/$part.pid
  if [ ! -f "$pidfile" ]; then echo "$part: not started by start.sh"; continue; fi
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && { pkill -9 -P "$pid" || true; kill -9 "$pid"; }  # the supervised worker too
    echo "$part: stopped (pid $pid)"
  else
    echo "$part: was not running"
  fi
  rm -f "$pidfile"
done
