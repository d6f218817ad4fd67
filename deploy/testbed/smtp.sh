#!/usr/bin/env bash
# smtp.sh start|stop [TESTBED_DIR] -- the SMTP sink (smtp_sink.py) on
# 127.0.0.1:M2D_SMTP_PORT (8025); every message lands as a .eml file in TESTBED_DIR/mail.
# Its pid file and log are in TESTBED_DIR/smtp, so the mail folder holds
# messages only.  The interpreter is $M2D_PYTHON (default python3); it needs
# aiosmtpd, which is in the project's requirements.txt, so the Makefile
# passes the project's .venv/bin/python.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

ACTION=${1:-}; shift || true
set_testbed_dir "${1:-}"
DIR=$TESTBED_DIR/smtp
MAIL_DIR=$TESTBED_DIR/mail
HOST=127.0.0.1
PORT=$M2D_SMTP_PORT   # lib.sh
PYTHON=${M2D_PYTHON:-python3}
PIDFILE=$DIR/smtp.pid
LOGFILE=$DIR/smtp.log
EXE_GLOB='python3*'
CMD_GLOB="*/smtp_sink.py *"

# smtp_banner: does an SMTP server greet us (220) on HOST:PORT?
smtp_banner() {
  timeout 3 bash -c '
    exec 3<>/dev/tcp/'"$HOST"'/'"$PORT"' || exit 1
    IFS= read -r -t 2 line <&3 && [[ $line == 220* ]]' 2>/dev/null
}

start() {
  mkdir -p "$DIR" "$MAIL_DIR"
  chmod 700 "$MAIL_DIR"   # mail carries links and names: not for the job account
  if pid=$(pid_alive "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB"); then
    log "smtp sink already running (pid $pid)"
    return 0
  fi
  port_busy "$PORT" && die "port $PORT is already in use by another process"
  "$PYTHON" -c 'import aiosmtpd' 2>/dev/null \
    || die "$PYTHON cannot import aiosmtpd: set M2D_PYTHON to the project's .venv/bin/python"
  start_bg "$PIDFILE" "$LOGFILE" "$PYTHON" -u "$M2D_TESTBED_SRC/smtp_sink.py" \
    --dir "$MAIL_DIR" --host "$HOST" --port "$PORT"
  WAIT_PID=$(cat "$PIDFILE") WAIT_LOG=$LOGFILE wait_until 20 "smtp sink" smtp_banner
  log "smtp sink started (pid $(cat "$PIDFILE")) on $HOST:$PORT -> $MAIL_DIR"
}

stop() {
  stop_pid smtp-sink "$PIDFILE" "$EXE_GLOB" "$CMD_GLOB" 10
}

case "$ACTION" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop [TESTBED_DIR]" >&2; exit 2 ;;
esac
