#!/usr/bin/env bash
# Runs ON every Cloud TPU VM worker: launch/tpu_vm.sh copies it there and calls it over ssh.
#
#   unpack TARBALL SHA      replace the code in ~/farmer_jax by the commit (its .venv and *.log
#                           are kept), with this script and constraints.txt from next to TARBALL
#   install JAX_REQ         in ~/farmer_jax: uv UV_VERSION (its standalone installer, into
#                           ~/.local/bin; no apt, no pip of the image), a Python 3.11 .venv, and
#                           uv pip install -c launch/constraints.txt JAX_REQ . (e.g. "jax[tpu]==X")
#   start NAME LOGDIR CMD   run CMD in ~/farmer_jax in the background, detached from ssh; output
#                           appended to ~/farmer_jax/NAME.log, copied to LOGDIR/worker-I.log
#                           every LOG_SYNC_S (60) s and at exit; refuses if NAME already runs,
#                           and (FARMER_COMMIT=SHA) if ~/farmer_jax holds another commit
#   ensure NAME LOGDIR CMD  the same, but leaves a running NAME alone
#   fg NAME LOGDIR CMD      the same in the foreground (also on the terminal); CMD's exit status
#   stop NAME [WAIT_S]      SIGTERM to NAME (farmer_jax saves a checkpoint and exits 0); with
#                           WAIT_S, also wait until NAME and its supervisor (final log upload) have
#                           exited, sending SIGKILL to NAME after WAIT_S seconds
#   status NAME             whether NAME runs, and its last exit status
#
# I is the worker number (metadata agent-worker-number). A NAME.log missing here (a new VM after a
# preemption) starts from the bucket copy, so LOGDIR/worker-I.log keeps the whole history.
set -euo pipefail

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
DIR=${FARMER_HOME:-$HOME/farmer_jax}
SYNC_S=${LOG_SYNC_S:-60}
UV_VERSION=${UV_VERSION:-0.13.8}          # pinned: https://astral.sh/uv/$UV_VERSION/install.sh
UV=$HOME/.local/bin/uv

die() {
  echo "tpu_worker.sh ($(hostname)): $*" >&2
  exit 2
}

worker_index() {
  local i
  if [[ -n ${WORKER_INDEX:-} ]]; then
    echo "$WORKER_INDEX"
    return
  fi
  i=$(curl -sf -m 5 -H 'Metadata-Flavor: Google' \
    http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number \
    2>/dev/null || true)
  if [[ $i =~ ^[0-9]+$ ]]; then
    echo "$i"
  elif [[ $(hostname) =~ -w-([0-9]+)$ ]]; then
    echo "${BASH_REMATCH[1]}"
  else
    hostname
  fi
}

running() {
  [[ -s $DIR/$1.pid ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

# BUSY: what the launcher runs here (training, smoke, an exec command) and is running, if any.
busy() {
  local name
  for name in train smoke eval fid sample; do
    if running "$name"; then BUSY=$name; return 0; fi
  done
  return 1
}

supervisor_running() {
  [[ -s $DIR/$1.sup ]] && kill -0 "$(cat "$DIR/$1.sup")" 2>/dev/null
}

upload() {  # LOG URL: best effort; the last error is kept in LOG.sync.err
  gcloud storage cp "$1" "$2" >/dev/null 2>"$1.sync.err" || true
}

# LOG URL: upload every SYNC_S s until SIGTERM. The trap runs only after an upload in flight has
# finished (bash waits for a foreground command), and at once during the pause (an interrupted
# `wait`), so once this loop has exited no older copy of LOG can still be on its way.
sync_loop() {
  local pause=""
  trap 'kill "$pause" 2>/dev/null; exit 0' TERM
  while :; do
    sleep "$SYNC_S" &
    pause=$!
    wait "$pause" || true
    upload "$1" "$2"
  done
}

unpack() {
  local tarball=$1 sha=$2
  [[ -f $tarball ]] || die "$tarball not found"
  mkdir -p "$DIR"
  cd "$DIR"
  if busy; then
    die "$BUSY runs here; let it finish, or stop it first (launch/tpu_vm.sh stop $BUSY)"
  fi
  # Everything but the venv and the logs is the previous commit's code: replace it.
  find . -mindepth 1 -maxdepth 1 ! -name .venv ! -name '*.log' -exec rm -rf -- {} +
  tar -xzf "$tarball"
  rm -f "$tarball"
  mkdir -p launch
  cp "$SELF" launch/tpu_worker.sh
  cp "$(dirname "$tarball")/constraints.txt" launch/constraints.txt
  echo "$sha" >COMMIT
  echo "worker $(worker_index): unpacked commit $sha in $DIR"
}

# uv UV_VERSION in ~/.local/bin from its standalone installer, unless that version is there.
install_uv() {
  local url=https://astral.sh/uv/$UV_VERSION/install.sh get
  if [[ -x $UV && $("$UV" --version 2>/dev/null) == "uv $UV_VERSION"* ]]; then
    return 0
  fi
  echo "worker $(worker_index): installing uv $UV_VERSION from $url"
  if command -v curl >/dev/null; then
    get=(curl -LsSf "$url")
  elif command -v wget >/dev/null; then
    get=(wget -qO- "$url")
  else
    die "neither curl nor wget found, so uv cannot be downloaded from $url; install one of" \
      "them, or put uv $UV_VERSION at $UV"
  fi
  "${get[@]}" | env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 \
    INSTALLER_NO_MODIFY_PATH=1 sh ||
    die "could not install uv $UV_VERSION from $url (does this worker reach the internet?)"
  [[ -x $UV && $("$UV" --version 2>/dev/null) == "uv $UV_VERSION"* ]] ||
    die "the uv installer from $url ran, but $UV is not uv $UV_VERSION"
}

# JAX_REQ: uv, a Python 3.11 .venv (the TPU images ship 3.10; jax >= 0.10 needs 3.11; uv downloads
# 3.11), then JAX_REQ and farmer_jax at the versions of launch/constraints.txt.
install() {
  local jax_req=$1
  cd "$DIR"
  [[ -f launch/constraints.txt ]] || die "$DIR/launch/constraints.txt not found; unpack first"
  if busy; then
    die "$BUSY runs here; let it finish, or stop it first (launch/tpu_vm.sh stop $BUSY)"
  fi
  install_uv
  if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null
  then
    rm -rf .venv
    "$UV" venv --python 3.11 .venv
  fi
  "$UV" pip install --python .venv/bin/python -c launch/constraints.txt "$jax_req" .
  .venv/bin/python -c 'import jax, farmer_jax; print("jax", jax.__version__)'
  echo "worker $(worker_index): installed commit $(cat COMMIT 2>/dev/null || echo unknown)"
}

# NAME LOGDIR CMD...: runs CMD with output appended to NAME.log, synced to the bucket; SIGTERM to
# this supervisor is not forwarded (a preemption signals CMD itself; a second one would hurt).
supervise() {
  local name=$1 logdir=$2 child syncer rc=0 url
  shift 2
  url=$logdir/worker-$(worker_index).log
  cd "$DIR"
  if [[ ! -e $name.log ]]; then
    gcloud storage cp "$url" "$name.log" >/dev/null 2>&1 || true
  fi
  printf '=== %s worker %s commit %s: %s\n' "$(date -u +%FT%TZ)" "$(worker_index)" \
    "$(cat COMMIT 2>/dev/null || echo unknown)" "$*" >>"$name.log"
  trap ':' TERM INT
  PYTHONUNBUFFERED=1 "$@" >>"$name.log" 2>&1 &
  child=$!
  echo "$child" >"$name.pid"
  echo "$$" >"$name.sup"
  sync_loop "$name.log" "$url" &
  syncer=$!
  while :; do
    if wait "$child"; then rc=0; else rc=$?; fi
    kill -0 "$child" 2>/dev/null || break
  done
  # The final upload must be the last write: stop the loop and wait for its upload in flight.
  kill -TERM "$syncer" 2>/dev/null || true
  while kill -0 "$syncer" 2>/dev/null; do wait "$syncer" || true; done
  printf '=== %s exit status %s\n' "$(date -u +%FT%TZ)" "$rc" >>"$name.log"
  upload "$name.log" "$url"
  echo "$rc" >"$name.exit"
  rm -f "$name.pid" "$name.sup"
  return "$rc"
}

start() {
  local mode=$1 name=$2 logdir=$3 i
  shift 3
  i=$(worker_index)
  [[ -d $DIR ]] || die "$DIR does not exist; run launch/tpu_vm.sh install first"
  if running "$name"; then
    echo "worker $i: $name already runs (pid $(cat "$DIR/$name.pid"))"
    [[ $mode == ensure ]] && return 0
    die "$name already runs; 'launch/tpu_vm.sh stop' stops it"
  fi
  if [[ -n ${FARMER_COMMIT:-} && $(cat "$DIR/COMMIT" 2>/dev/null) != "$FARMER_COMMIT" ]]; then
    die "$DIR holds commit $(cat "$DIR/COMMIT" 2>/dev/null || echo none), not the run's" \
      "$FARMER_COMMIT; nothing was started. Run launch/tpu_vm.sh install (it ships the run's" \
      "commit), then train"
  fi
  rm -f "$DIR/$name.exit"
  nohup setsid bash "$SELF" supervise "$name" "$logdir" "$@" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 100); do
    [[ -s $DIR/$name.pid || -e $DIR/$name.exit ]] && break
    sleep 0.1
  done
  echo "worker $i: started $name; log $DIR/$name.log -> $logdir/worker-$i.log"
}

foreground() {
  local name=$1 logdir=$2 sup rc=0 from=1
  [[ -d $DIR ]] || die "$DIR does not exist; run launch/tpu_vm.sh install first"
  if running "$name"; then die "$name already runs"; fi
  rm -f "$DIR/$name.exit"
  if [[ -e $DIR/$name.log ]]; then from=$(($(stat -c %s "$DIR/$name.log") + 1)); fi
  bash "$SELF" supervise "$@" &
  sup=$!
  for _ in $(seq 100); do
    [[ -e $DIR/$name.log ]] && break
    sleep 0.1
  done
  tail -c "+$from" -s 0.2 -f --pid="$sup" "$DIR/$name.log" &
  if wait "$sup"; then rc=0; else rc=$?; fi
  wait
  echo "worker $(worker_index): $name exited with status $rc; log at $logdir/"
  return "$rc"
}

stop() {
  local name=$1 wait_s=${2:-} i waited=0
  i=$(worker_index)
  if running "$name"; then
    kill -TERM "$(cat "$DIR/$name.pid")" 2>/dev/null || true
    echo "worker $i: sent SIGTERM to $name (pid $(cat "$DIR/$name.pid" 2>/dev/null))"
  else
    echo "worker $i: $name is not running"
  fi
  [[ -n $wait_s ]] || return 0
  [[ $wait_s =~ ^[0-9]+$ ]] || die "stop NAME WAIT_S: WAIT_S must be a number of seconds"
  while running "$name" && ((waited < wait_s * 10)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if running "$name"; then
    echo "worker $i: $name still runs after $wait_s s; sending SIGKILL"
    kill -KILL "$(cat "$DIR/$name.pid")" 2>/dev/null || true
  fi
  waited=0                                      # the supervisor's final log upload
  while { running "$name" || supervisor_running "$name"; } && ((waited < 1200)); do
    sleep 0.1
    waited=$((waited + 1))
  done
  if running "$name" || supervisor_running "$name"; then
    die "$name or its supervisor still runs after SIGKILL"
  fi
  echo "worker $i: $name has exited"
}

status() {
  local name=$1
  if running "$name"; then
    echo "worker $(worker_index): $name runs (pid $(cat "$DIR/$name.pid"))"
  else
    echo "worker $(worker_index): $name not running; last exit status:" \
      "$(cat "$DIR/$name.exit" 2>/dev/null || echo none)"
  fi
}

action=${1:-}
if [[ $# -gt 0 ]]; then shift; fi
case $action in
  unpack) [[ $# -eq 2 ]] || die "usage: unpack TARBALL SHA"; unpack "$@" ;;
  install) [[ $# -eq 1 ]] || die "usage: install JAX_REQ"; install "$@" ;;
  start | ensure) [[ $# -ge 3 ]] || die "usage: $action NAME LOGDIR CMD..."; start "$action" "$@" ;;
  fg) [[ $# -ge 3 ]] || die "usage: fg NAME LOGDIR CMD..."; foreground "$@" ;;
  supervise) supervise "$@" ;;
  stop) [[ $# -eq 1 || $# -eq 2 ]] || die "usage: stop NAME [WAIT_S]"; stop "$@" ;;
  status) [[ $# -eq 1 ]] || die "usage: status NAME"; status "$@" ;;
  *) die "usage: tpu_worker.sh unpack|install|start|ensure|fg|stop|status ... (see the header)" ;;
esac
