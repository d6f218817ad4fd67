#!/usr/bin/env bash
# redis.sh start|stop [TESTBED_DIR] -- a Redis on 127.0.0.1:6379 for the rq
# queues.  If one already answers PING there (many machines run one) it is
# reused and stop leaves it alone; otherwise we start our own, daemonized,
# keeping nothing on disk (Redis carries only ids of work, never state).
# State: TESTBED_DIR/redis (pid file, log, the "reused" note).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=${1:-}; shift || true
set_testbed_dir "${1:-}"
DIR=$TESTBED_DIR/redis
PORT=6379
PIDFILE=$DIR/redis.pid
# Debian's /usr/bin/redis-server is a link to redis-check-rdb, which is what
# /proc/PID/exe then shows
EXE_GLOB='@(redis-server|redis-check-rdb)'
CMD_GLOB="redis-server 127.0.0.1:$PORT*"

# redis_ping: does a Redis answer PING on 127.0.0.1:PORT (no redis-cli needed)
redis_ping() {
  timeout 3 bash -c '
    exec 3<>/dev/tcp/127.0.0.1/'"$PORT"' || exit 1
    printf "PING\r\n" >&3
    IFS= read -r -t 2 line <&3 && [[ $line == +PONG* ]]' 2>/dev/null
}

start() {
  mkdir -p "$DIR"
  if pid=$(pid_alive "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB"); then
    log "redis already running (ours, pid $pid)"
    return 0
  fi
  rm -f "$PIDFILE"
  if redis_ping; then
    [ -e "$DIR/reused" ] ||
      echo "a Redis already answered on 127.0.0.1:$PORT; redis.sh did not start it" > "$DIR/reused"
    log "reusing the Redis already running on 127.0.0.1:$PORT (stop will leave it alone)"
    return 0
  fi
  port_busy "$PORT" && die "port $PORT is taken by something that does not answer Redis PING"
  rm -f "$DIR/reused"
  require_root
  apt_install redis-server
  # --save '' and no AOF: nothing kept on disk; daemonize writes the pid file
  redis-server --bind 127.0.0.1 --port "$PORT" --daemonize yes \
    --pidfile "$PIDFILE" --logfile "$DIR/redis.log" --dir "$DIR" \
    --save '' --appendonly no
  wait_until 15 "redis on 127.0.0.1:$PORT" redis_ping
  log "redis started (pid $(cat "$PIDFILE"))"
}

stop() {
  if [ -e "$DIR/reused" ] && [ ! -s "$PIDFILE" ]; then
    log "leaving the Redis on 127.0.0.1:$PORT alone: we did not start it"
    rm -f "$DIR/reused"
    return 0
  fi
  stop_pid redis "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB" 15
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [TESTBED_DIR]" >&2; exit 2 ;;
esac
