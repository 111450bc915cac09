#!/usr/bin/env bash
# Starts the inference service on this machine: scripts/start.sh [redis|api|celery|web]... (default: redis,
# celery, api). 'web' is a second API process on 127.0.0.1:7860 (MEDSAM2HITL_WEB_PORT) whose / is the browser
# viewer; the viewer is also at / of the API itself. 'gradio' (the seed's name for its browser UI) is 'web'.
# Logs go to run/logs/<part>.log and PIDs to run/pids/<part>.pid (MEDSAM2HITL_RUN_DIR moves the folder).
# The model worker runs under scripts/supervise.sh: when it crashes or is killed, a new one starts (back-off).
# Settings are MEDSAM2HITL_* environment variables (README, "The inference service"); by default the API
# listens on 127.0.0.1:8000 and the worker uses the project's fixture model.
set -euo pipefail
cd "$(dirname "$0")/.."
run=${MEDSAM2HITL_RUN_DIR:-run}
mkdir -p "$run/logs" "$run/pids" "$run/redis"
run=$(cd "$run" && pwd)
export MEDSAM2HITL_DATA_DIR=${MEDSAM2HITL_DATA_DIR:-$run/data}
redis_port=${MEDSAM2HITL_REDIS_PORT:-6379}
export MEDSAM2HITL_REDIS_URL=${MEDSAM2HITL_REDIS_URL:-redis://127.0.0.1:$redis_port/0}
py=.venv/bin/python
[ -x "$py" ] || { echo "no .venv: run 'bash scripts/setup.sh' first" >&2; exit 1; }

running() { [ -f "$run/pids/$1.pid" ] && kill -0 "$(cat "$run/pids/$1.pid")" 2>/dev/null; }

launch() {  # name, command...
  local name=$1; shift
  if running "$name"; then echo "$name: already running (pid $(cat "$run/pids/$name.pid"))"; return; fi
  nohup "$@" >>"$run/logs/$name.log" 2>&1 &
  echo $! >"$run/pids/$name.pid"
  echo "$name: started (pid $!, log $run/logs/$name.log)"
}

start_redis() {
  if "$py" -c "import redis,sys; redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()" \
      "$MEDSAM2HITL_REDIS_URL" 2>/dev/null; then
    echo "redis: already answering at $MEDSAM2HITL_REDIS_URL (not started by this script)"; return
  fi
  if ! command -v redis-server >/dev/null; then
    cat >&2 <<'TXT'
redis-server is not installed. Install it, then run this again:
  Debian/Ubuntu: sudo apt-get install redis-server
  macOS:         brew install redis
  Docker:        docker run -d -p 127.0.0.1:6379:6379 redis:7
TXT
    exit 1
  fi
  launch redis redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$run/redis" --appendonly yes --save ""
}

wait_http() {  # url, seconds
  for _ in $(seq 1 $(( $2 * 5 ))); do
    "$py" -c "import httpx,sys; sys.exit(httpx.get(sys.argv[1]).status_code != 200)" "$1" 2>/dev/null && return 0
    sleep 0.2
  done
  return 1
}

parts=("$@"); [ ${#parts[@]} -gt 0 ] || parts=(redis celery api)
for i in "${!parts[@]}"; do if [ "${parts[$i]}" = gradio ]; then parts[$i]=web; fi; done
for part in "${parts[@]}"; do
  case $part in
    redis) start_redis ;;
    celery|worker) launch celery bash scripts/supervise.sh "$py" -m medsam2hitl_server worker ;;
    api) launch api "$py" -m medsam2hitl_server api ;;
    web) MEDSAM2HITL_PORT=${MEDSAM2HITL_WEB_PORT:-7860} launch web "$py" -m medsam2hitl_server api ;;
    *) echo "unknown part '$part': use redis, api, celery or web (gradio)" >&2; exit 2 ;;
  esac
done
api="http://${MEDSAM2HITL_HOST:-127.0.0.1}:${MEDSAM2HITL_PORT:-8000}"
if printf '%s\n' "${parts[@]}" | grep -qx api; then
  if wait_http "$api/readyz" 90; then
    echo "ready: API $api  (OpenAPI docs: $api/docs)"
  else
    echo "not ready after 90 s: see $run/logs/ (api.log, celery.log) and $api/readyz" >&2; exit 1
  fi
fi
if printf '%s\n' "${parts[@]}" | grep -qx web; then
  web="http://${MEDSAM2HITL_HOST:-127.0.0.1}:${MEDSAM2HITL_WEB_PORT:-7860}"
  if wait_http "$web/readyz" 90; then
    echo "ready: web viewer $web"
  else
    echo "the web viewer is not ready after 90 s: see $run/logs/web.log and $web/readyz" >&2; exit 1
  fi
fi
