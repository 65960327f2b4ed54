#!/usr/bin/env bash
# Cloud TPU VM slices (v4, v5e, v5p): request the slice as a queued resource, ship this commit to
# every worker, install, run the same `farmer_jax train` on every worker, read logs, resume after a
# preemption (with the commit the run started with, WORKDIR/launch/commit), delete; or supervise
# all of it unattended; run `farmer_jax eval|fid|sample` on every worker (inputs staged from the
# bucket to each worker's disk). Walkthrough, defaults and costs: docs/launch.md.
#
#   PROJECT=my-proj TPU=farmer-v4 TYPE=v4-32 WORKDIR=gs://my-bucket/farmer_1.1b_p16 \
#   CONFIG=imagenet256:1.1B/16,data_dir=gs://my-bucket/tfds \
#   launch/tpu_vm.sh up [--config.x=y ...]
#
# Nothing is created unless an action is named. DRY_RUN=1 prints every command (`+ ...`) instead
# of running it. Arguments after the action are forwarded to `farmer_jax train` (exec: after
# the command, to that command).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"                                   # CONFIG paths are relative to the repository root
exec 3>&1                                    # `+ command` lines go here, even from $(...)
DRY_RUN=${DRY_RUN:-0}
PROG=launch/tpu_vm.sh
QR_ID=${QR_ID:-${TPU:+$TPU-qr}}
V5E_SIZES="1 4 8 16 32 64 128 256"           # v5litepod-N: the slice shapes Cloud TPU offers
MESH=${MESH:-"(('data', 1), ('fsdp', -1))"}
SMOKE_MESH="(('data', -1), ('fsdp', 1))"
SMOKE_RECORDS=16                             # records of each split smoke reads on every worker
STARTED=0                                    # 1 once this call has started training
EXEC_CMDS="eval fid sample"                  # the farmer_jax commands `exec` runs on the slice
STAGE=../farmer_jax_stage                    # exec's inputs and outputs on each worker, from
                                             # ~/farmer_jax (tpu_worker.sh runs commands there)
SCOPES=https://www.googleapis.com/auth/cloud-platform

usage() {
  cat >&2 <<EOF
usage: $PROG ACTION [--config.x=y ...]     (arguments after ACTION go to farmer_jax train)

actions ("\$" = creates or keeps paying for a TPU slice):
  up          \$ check, create, install, smoke, train: the first launch (alias: all); a failed
                smoke stops it before training, the slice left up
  check         farmer_jax check locally for the slice's devices/processes (no cloud call)
  create      \$ request the slice as a queued resource and wait until it is ACTIVE
  install       ship the local commit (git archive HEAD) to every worker and install it
  train         start training in the background on every worker (alias: run)
  smoke         on every worker: the devices it sees and a few records of the data it reads;
                then 50 quickstart steps on the slice
  exec CMD ARGS run farmer_jax CMD (eval, fid or sample) with ARGS in the foreground on every
                worker, at the run's commit (installed where a worker lacks it); gs://
                --model/--inception/--ref are copied to each worker's disk first; results go
                to WORKDIR/eval/ (samples: WORKDIR/samples/), logs to WORKDIR/logs/CMD/, e.g.
                exec fid --model=gs://B/exports/m --inception=gs://B/pt_inception.pth
                --ref=gs://B/VIRTUAL_imagenet256_labeled.npz --num=50000
  logs [NAME]   tail of a worker's log (NAME: train, or an exec CMD): WORKER=0 TAIL=50; from the
                bucket if WORKDIR is set
  status        queued resource and TPU state; with WORKDIR, whether the run has finished
  stop [NAME]   SIGTERM the training (or an exec CMD) on every worker (training checkpoints
                and exits 0)
  resume      \$ after a preemption: reset/recreate the slice if it is gone, reinstall, train
                (on a READY slice: restart training on ALL workers unless it runs on all)
  supervise   \$ stays running here: create, install, smoke, train (first launch); then every
                SUPERVISE_POLL_S (300) s: resume after a preemption, delete once summary.json
                exists (opt-in unattended mode; run it under nohup/tmux)
  poll          one step of supervise (exit 0 running, 3 restarted, 4 finished and deleted)
  delete        delete the queued resource and its TPU (the bucket is kept)

settings (environment):
  PROJECT, TPU             always; ZONE defaults from TYPE
  TYPE                     v4-N, v5litepod-N (v5e) or v5p-N, e.g. v4-32, v5litepod-16, v5p-64
  WORKDIR                  gs://BUCKET/PATH (checkpoints, metrics, logs/worker-I.log)
  CONFIG                   e.g. imagenet256:1.1B/16,data_dir=gs://BUCKET/tfds
  VERSION                  TPU runtime (default from TYPE);  SPOT=1: Spot capacity
  MESH                     default "(('data', 1), ('fsdp', -1))" (FSDP over the whole slice)
  CACHE                    XLA compilation cache, default gs://BUCKET/xla_cache
  QR_ID                    queued resource name, default TPU-qr;  SERVICE_ACCOUNT (optional)
  SKIP_CHECK=1             skip the local farmer_jax check;  ALLOW_DIRTY=1: ship HEAD anyway
  SKIP_SMOKE=1             up, supervise: no smoke before training
  FORCE_COMMIT=1           ship HEAD to a run recorded (WORKDIR/launch/commit) with another commit
  SUPERVISE_POLL_S, MAX_RESTARTS, MAX_FAILS, SUPERVISE_KEEP   supervise: 300, 20, 5, 0
  STOP_WAIT_S              resume: seconds a stopping run gets before SIGKILL (default 300)
  DRY_RUN=1                print the commands instead of running them
EOF
}

die() {
  echo "$PROG: $*" >&2
  exit 2
}

# shell_join
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

# The one wrapper for external commands: prints `+ CMD`, then runs it (DRY_RUN=1: only prints).
#   -q  do not print when really running (polling)   -a  run even when DRY_RUN=1 (local, no cost)
run_cmd() {
  local quiet=0 always=0
  while [[ ${1:-} == -[qa] ]]; do
    [[ $1 == -q ]] && quiet=1
    [[ $1 == -a ]] && always=1
    shift
  done
  if [[ $DRY_RUN == 1 || $quiet == 0 ]]; then
    printf '+ %s\n' "$(shell_join "$@")" >&3
  fi
  if [[ $DRY_RUN == 1 && $always == 0 ]]; then
    return 0
  fi
  "$@"
}

pause() {
  if [[ $DRY_RUN != 1 ]]; then
    sleep "$1"
  fi
}

need() {
  local v
  for v in "$@"; do
    if [[ -z ${!v:-} ]]; then
      die "set $v (see '$PROG' without arguments for every setting)"
    fi
  done
}

# TYPE -> GEN, CHIPS, DEVICES (one JAX device per chip), PROCESSES (one per host), default VERSION
# and ZONE. v4-N / v5p-N count TensorCores (2 per chip), 4 chips per host; v5litepod-N counts
# chips (N in V5E_SIZES), one host up to 8 chips, 4 chips per host beyond.
parse_type() {
  need TYPE
  local n=${TYPE#*-} version zone
  case $TYPE in
    v4-*) GEN=v4 version=tpu-ubuntu2204-base zone=us-central2-b ;;
    v5litepod-*) GEN=v5e version=v2-alpha-tpuv5-lite zone=us-west4-a ;;
    v5p-*) GEN=v5p version=v2-alpha-tpuv5 zone=us-east5-a ;;
    *) die "TYPE=$TYPE is not supported; use one of: v4-N (e.g. v4-32), v5litepod-N (v5e, e.g." \
         "v5litepod-16), v5p-N (e.g. v5p-64)" ;;
  esac
  [[ $n =~ ^[1-9][0-9]*$ ]] || die "TYPE=$TYPE: the part after '-' must be a number, e.g. v4-32"
  if [[ $GEN == v5e ]]; then
    CHIPS=$n
    if ((n <= 8)); then PROCESSES=1; else PROCESSES=$((n / 4)); fi
    [[ " $V5E_SIZES " == *" $n "* ]] ||
      die "TYPE=$TYPE is not a v5e slice shape; use v5litepod-N with N one of: $V5E_SIZES"
  else
    CHIPS=$((n / 2))
    PROCESSES=$((CHIPS / 4))
    ((n % 8 == 0)) || die "TYPE=$TYPE: $GEN-N needs N (TensorCores) a multiple of 8, e.g. $GEN-32"
  fi
  DEVICES=$CHIPS
  VERSION=${VERSION:-$version}
  ZONE=${ZONE:-$zone}
}

# ZONE for the actions that do not need TYPE (delete, logs, stop, status).
need_zone() {
  if [[ -z ${ZONE:-} && -n ${TYPE:-} ]]; then
    parse_type
  fi
  need PROJECT ZONE TPU
}

parse_workdir() {
  need WORKDIR
  WORKDIR=${WORKDIR%/}
  [[ $WORKDIR =~ ^gs://([a-z0-9][-a-z0-9_.]*)/[^/].*$ ]] ||
    die "WORKDIR=$WORKDIR must be gs://BUCKET/PATH: a TPU VM's local disk is per host and lost" \
      "on preemption, so checkpoints, metrics and logs go to a bucket"
  BUCKET=gs://${BASH_REMATCH[1]}
  CACHE=${CACHE:-$BUCKET/xla_cache}
}

train_args() {
  TRAIN_ARGS=(--config="$CONFIG" --workdir="$WORKDIR" --distributed=auto
    --compilation_cache_dir="$CACHE" --config.mesh="$MESH" "$@")
}

# Sets RUN_SHA to the commit recorded for the run in WORKDIR/launch/commit ("" before its first
# training start). A failed read other than "not found" stops: the record is what keeps a resumed
# run on its own code. DRY_RUN=1: prints the read, assumes no record.
read_run_commit() {
  local out errf rc=0
  RUN_SHA="" RUN_SHA_READ=1
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd gcloud storage cat "$WORKDIR/launch/commit"
    return 0
  fi
  errf=$(mktemp)
  out=$(run_cmd -q gcloud storage cat "$WORKDIR/launch/commit" 2>"$errf") || rc=$?
  if ((rc == 0)); then
    RUN_SHA=$(head -n 1 <<<"$out" | tr -d '[:space:]')
    [[ $RUN_SHA =~ ^[0-9a-f]{40}$ ]] ||
      die "$WORKDIR/launch/commit holds '$RUN_SHA', not a commit; write the run's commit" \
        "(git rev-parse HEAD of the checkout it was launched from) there, or remove it"
  elif ! grep -Eq 'matched no objects|No URLs matched|HTTPError 404' "$errf"; then
    die "could not read $WORKDIR/launch/commit (exit status $rc: $(tail -n 2 "$errf" |
      tr '\n' ' ')); nothing was changed. Check gcloud and run the same command again"
  fi
  rm -f "$errf"
}

# SHIP_SHA = HEAD, the commit the workers get (git archive). Refuses a commit that is not what the
# user is looking at, or that lacks the CONFIG file (the part of CONFIG before ':', a shipped
# config's name standing for farmer_jax/configs/NAME.py) as it is here.
git_head() {
  local cfg
  if [[ -n ${SHIP_SHA:-} ]]; then return 0; fi
  SHIP_SHA=$(git -C "$ROOT" rev-parse --verify -q HEAD) || die "$ROOT has no commit to ship"
  if [[ -n ${CONFIG:-} ]]; then
    cfg=${CONFIG%%:*}
    [[ $cfg == */* || $cfg == *.py ]] || cfg=farmer_jax/configs/$cfg.py
    if ! git -C "$ROOT" ls-files --error-unmatch -- "$cfg" >/dev/null 2>&1; then
      [[ ${ALLOW_DIRTY:-0} == 1 ]] ||
        die "the config file $cfg is not tracked by git (or does not exist), so the commit the" \
          "workers get (git archive HEAD) does not contain it. git add and commit it, or set" \
          "ALLOW_DIRTY=1 to ship HEAD ${SHIP_SHA:0:12} anyway"
      echo "$PROG: ALLOW_DIRTY=1: $cfg is untracked; the workers will not have it" >&2
    elif ! git -C "$ROOT" diff --quiet HEAD -- "$cfg"; then
      [[ ${ALLOW_DIRTY:-0} == 1 ]] ||
        die "the config file $cfg has uncommitted changes, and the workers get it as in HEAD" \
          "${SHIP_SHA:0:12} (git archive HEAD). Commit it, or set ALLOW_DIRTY=1 to ship HEAD anyway"
      echo "$PROG: ALLOW_DIRTY=1: the workers get $cfg as in HEAD, not your edits" >&2
    fi
  fi
  if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
    [[ ${ALLOW_DIRTY:-0} == 1 ]] ||
      die "the working tree has uncommitted changes to tracked files, and workers get the" \
        "commit (git archive HEAD), not your edits. Commit them, or set ALLOW_DIRTY=1 to ship" \
        "HEAD ${SHIP_SHA:0:12} without them"
    echo "$PROG: ALLOW_DIRTY=1: shipping HEAD ${SHIP_SHA:0:12}; uncommitted changes stay here" >&2
  fi
}

# Refuses to ship (git_head's SHIP_SHA) to a run in WORKDIR recorded with another commit, unless
# FORCE_COMMIT=1 (then HEAD becomes the run's commit at its next training start).
check_run_commit() {
  git_head
  read_run_commit
  if [[ -n $RUN_SHA && $RUN_SHA != "$SHIP_SHA" ]]; then
    [[ ${FORCE_COMMIT:-0} == 1 ]] ||
      die "the run in $WORKDIR was launched from commit ${RUN_SHA:0:12} ($WORKDIR/launch/commit)" \
        "and this checkout is at ${SHIP_SHA:0:12}; nothing was changed. Resume it with its own" \
        "code: git checkout $RUN_SHA, then the same command; or set FORCE_COMMIT=1 to ship" \
        "${SHIP_SHA:0:12} and record it as the run's commit"
    echo "$PROG: FORCE_COMMIT=1: shipping ${SHIP_SHA:0:12} to the run launched from" \
      "${RUN_SHA:0:12}; it becomes the run's commit" >&2
  fi
}

# The commit training starts with (SHIP_SHA): what install shipped in this call, else the run's
# recorded commit, else (a first start, or FORCE_COMMIT=1) HEAD. Records it in WORKDIR/launch/commit
# when that does not hold it yet: the run's commit is the one of its first training start.
run_commit() {
  [[ ${RUN_SHA_READ:-0} == 1 ]] || read_run_commit
  if [[ -z ${SHIP_SHA:-} ]]; then
    SHIP_SHA=$RUN_SHA
    if [[ -z $SHIP_SHA || ${FORCE_COMMIT:-0} == 1 ]]; then
      SHIP_SHA=$(git -C "$ROOT" rev-parse --verify -q HEAD) || die "$ROOT has no commit"
    fi
  fi
  if [[ $RUN_SHA != "$SHIP_SHA" ]]; then
    run_cmd gcloud storage cp - "$WORKDIR/launch/commit" <<<"$SHIP_SHA"
    RUN_SHA=$SHIP_SHA
  fi
}

need_gcloud() {
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null; then
    die "gcloud not found: install the Google Cloud CLI and run 'gcloud auth login'"
  fi
}

# farmer_jax check CONFIG on this machine for the slice's devices/processes, before paying.
check_local() {
  if [[ ${SKIP_CHECK:-0} == 1 ]]; then
    echo "SKIP_CHECK=1: not checking the config locally"
    return 0
  fi
  command -v farmer_jax >/dev/null ||
    die "farmer_jax is not installed here, so the config cannot be checked before the slice is" \
      "created. Install it (pip install -e . in $ROOT) or set SKIP_CHECK=1 to skip the check"
  run_cmd -a farmer_jax check "$@" --devices="$DEVICES" --processes="$PROCESSES" ||
    die "farmer_jax check failed (above); nothing was created. SKIP_CHECK=1 skips the check"
}

ssh_to() {
  local worker=$1 remote=$2
  echo "# on worker(s) $worker: $remote" >&3
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU" --project="$PROJECT" --zone="$ZONE" \
    --worker="$worker" --command="$remote"
}

# ssh_to all REMOTE, after which each worker prints its own exit status (gcloud's, with
# --worker=all, is not relied on). Returns 0 when all PROCESSES workers exited 0; else 1, with
# WORKERS_FAILED saying which did not, e.g. "3 of 4 workers exited 0 (tpu1-w-1 rc=3)".
# DRY_RUN=1: prints it, returns 0.
on_all_workers() {
  local outf rc=0 ok=0 failed="" line
  local exits=()
  outf=$(mktemp)
  ssh_to all "$1; rc=\$?; echo \"farmer_jax-exit \$(hostname) rc=\$rc\"; exit \$rc" |
    tee "$outf" || rc=$?
  mapfile -t exits < <(grep -o 'farmer_jax-exit [^ ]* rc=[0-9]*' "$outf" || true)
  rm -f "$outf"
  [[ $DRY_RUN != 1 ]] || return 0
  for line in "${exits[@]}"; do
    line=${line#farmer_jax-exit }
    if [[ $line == *" rc=0" ]]; then ok=$((ok + 1)); else failed+="${failed:+, }$line"; fi
  done
  ((ok != PROCESSES)) || return 0
  if ((${#exits[@]} < PROCESSES)); then
    failed+="${failed:+; }$((PROCESSES - ${#exits[@]})) did not answer, ssh exit status $rc"
  fi
  WORKERS_FAILED="$ok of $PROCESSES workers exited 0 ($failed)"
  return 1
}

# describe qr|tpu ASSUMED: sets STATE to the state of the queued resource / the TPU, or to
# NOT_FOUND when gcloud says it does not exist. Any other failure (network, auth, quota, an empty
# answer) is retried, QUERY_TRIES (5) attempts POLL_S apart; then describe returns 1 with the error
# in QUERY_ERR: a failed query never reads as "not found". DRY_RUN=1: prints it, STATE=ASSUMED.
describe() {
  local what=$1 assumed=$2 tries=${QUERY_TRIES:-5} try rc out errf cmd
  if [[ $what == qr ]]; then
    cmd=(gcloud compute tpus queued-resources describe "$QR_ID" --project="$PROJECT"
      --zone="$ZONE" --format='value(state.state)')
  else
    cmd=(gcloud compute tpus tpu-vm describe "$TPU" --project="$PROJECT" --zone="$ZONE"
      --format='value(state)')
  fi
  STATE="" QUERY_ERR=""
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd "${cmd[@]}"
    STATE=$assumed
    return 0
  fi
  errf=$(mktemp)
  for ((try = 1; ; try++)); do
    rc=0
    out=$("${cmd[@]}" 2>"$errf") || rc=$?
    out=${out//[[:space:]]/}
    if ((rc == 0)) && [[ -n $out ]]; then
      STATE=$out
      break
    fi
    if ((rc != 0)) && grep -Eq 'NOT_FOUND|was not found|HTTPError 404' "$errf"; then
      STATE=NOT_FOUND
      break
    fi
    QUERY_ERR="exit status $rc: $(tail -n 2 "$errf" | tr '\n' ' ')"
    ((rc != 0)) || QUERY_ERR="an empty answer"
    if ((try >= tries)); then
      rm -f "$errf"
      return 1
    fi
    echo "$PROG: $(shell_join "${cmd[@]:0:5}") failed (attempt $try of $tries: $QUERY_ERR);" \
      "retrying in ${POLL_S:-30} s" >&2
    pause "${POLL_S:-30}"
  done
  rm -f "$errf"
}

# describe, or stop: nothing is deleted or created on a state that could not be read.
must_describe() {
  local name=$QR_ID
  [[ $1 == qr ]] || name=$TPU
  describe "$@" ||
    die "could not read the state of $name ($QUERY_ERR); nothing was changed. Check gcloud" \
      "(auth, network, quota) and run the same command again"
}

wait_active() {
  local last=none
  while :; do
    must_describe qr ACTIVE
    if [[ $STATE != "$last" ]]; then
      echo "$(date -u +%H:%M:%SZ) queued resource $QR_ID: $STATE"
      [[ $STATE != WAITING_FOR_RESOURCES ]] ||
        echo "  (waiting for capacity can take hours; Ctrl-C stops waiting, the request stays" \
          "queued and is billed from ACTIVE on, until '$PROG delete')"
      last=$STATE
    fi
    case $STATE in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING | NOT_FOUND)
        die "queued resource $QR_ID is $STATE; see 'gcloud compute tpus queued-resources" \
          "describe $QR_ID --zone=$ZONE', then '$PROG resume' (or '$PROG delete')" ;;
    esac
    pause "${POLL_S:-30}"
  done
}

create() {
  local args
  must_describe qr NOT_FOUND
  while [[ $STATE == DELETING ]]; do           # a delete just before (resume) may still run
    echo "queued resource $QR_ID is DELETING; waiting"
    pause "${POLL_S:-30}"
    must_describe qr NOT_FOUND
  done
  case $STATE in
    NOT_FOUND)
      args=(--node-id="$TPU" --project="$PROJECT" --zone="$ZONE" --accelerator-type="$TYPE"
        --runtime-version="$VERSION" --scopes="$SCOPES")
      if [[ -n ${SERVICE_ACCOUNT:-} ]]; then args+=(--service-account="$SERVICE_ACCOUNT"); fi
      if [[ ${SPOT:-0} == 1 ]]; then args+=(--spot); fi
      run_cmd gcloud compute tpus queued-resources create "$QR_ID" "${args[@]}" ;;
    ACTIVE) echo "queued resource $QR_ID is already ACTIVE; not creating it again" ;;
    ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING)
      echo "queued resource $QR_ID was already requested ($STATE)" ;;
    *) die "queued resource $QR_ID exists and is $STATE: '$PROG resume' resets or recreates" \
         "it, '$PROG delete' removes it" ;;
  esac
  wait_active
}

delete_qr() {
  run_cmd gcloud compute tpus queued-resources delete "$QR_ID" --project="$PROJECT" \
    --zone="$ZONE" --force --quiet
}

# The commit, then (tpu_worker.sh install) a pinned uv, a Python 3.11 venv, jax[tpu] at the
# constraints' jax version and the package, on every worker.
install() {
  git_head
  local tarball=/tmp/farmer_jax-$SHIP_SHA.tar.gz try jax_version remote
  jax_version=$(sed -n 's/^jax==//p' "$ROOT/launch/constraints.txt")
  [[ -n $jax_version ]] || die "launch/constraints.txt pins no jax version"
  run_cmd git -C "$ROOT" archive --format=tar.gz -o "$tarball" "$SHIP_SHA"
  for try in 1 2 3 4 5; do                    # a fresh slice may refuse ssh for a minute
    run_cmd gcloud compute tpus tpu-vm scp "$tarball" "$ROOT/launch/tpu_worker.sh" \
      "$ROOT/launch/constraints.txt" "$TPU:/tmp/" --worker=all --project="$PROJECT" \
      --zone="$ZONE" && break
    ((try < 5)) || die "could not copy to the workers of $TPU"
    echo "copy failed (attempt $try of 5); retrying in 30 s" >&2
    pause 30
  done
  if [[ $DRY_RUN != 1 ]]; then rm -f "$tarball"; fi
  remote="set -eu; bash /tmp/tpu_worker.sh unpack $(shell_join "$tarball" "$SHIP_SHA")"
  remote+="; cd ~/farmer_jax"
  remote+="; bash launch/tpu_worker.sh install $(shell_join "jax[tpu]==$jax_version")"
  ssh_to all "$remote"
}

# $1: start (refuses if training runs) or ensure (leaves running training alone); then train args.
train() {
  local mode=$1
  shift
  train_args "$@"
  run_commit
  # the run's identity for the workdir lock: after a preemption the recreated slice's process
  # takes over its own run's lock at once (docs/reliability.md); FARMER_COMMIT: a worker whose
  # ~/farmer_jax holds another commit refuses to start
  ssh_to all "cd ~/farmer_jax && FARMER_RUN_ID=$(shell_join "tpu-qr:$PROJECT/$ZONE/$QR_ID") \
    FARMER_COMMIT=$SHIP_SHA $(shell_join bash launch/tpu_worker.sh "$mode" train \
    "$WORKDIR/logs" .venv/bin/farmer_jax train "${TRAIN_ARGS[@]}")"
  STARTED=1
  cat <<EOF
training runs on every worker of $TPU; each copies its log to $WORKDIR/logs/ every 60 s
  follow:  PROJECT=$PROJECT ZONE=$ZONE TPU=$TPU WORKDIR=$WORKDIR $PROG logs
  after a preemption: the same settings and arguments with '$PROG resume'
  when done: PROJECT=$PROJECT ZONE=$ZONE TPU=$TPU $PROG delete   (the TPU is paid until then)
EOF
}

finished() {
  if [[ $DRY_RUN == 1 ]]; then
    run_cmd gcloud storage ls "$WORKDIR/summary.json"
    return 1
  fi
  run_cmd -q gcloud storage ls "$WORKDIR/summary.json" >/dev/null 2>&1
}

# The smoke run: SMOKE_DIR (its workdir, WORKDIR/smoke-TIMESTAMP) and SMOKE_ARGS (quickstart,
# 50 steps, a batch that fits this slice's devices, then $@), checked here (check_local) before
# the slice runs anything.
smoke_plan() {
  local batch=$(((32 + DEVICES - 1) / DEVICES * DEVICES))  # quickstart's 32, a multiple of DEVICES
  SMOKE_DIR=$WORKDIR/smoke-$(date -u +%Y%m%d-%H%M%S)
  SMOKE_ARGS=(--config=quickstart --workdir="$SMOKE_DIR" --config.train.steps=50
    --config.train.log_every=10 --config.train.batch_size="$batch" --config.mesh="$SMOKE_MESH"
    "$@")
  check_local "${SMOKE_ARGS[@]}"
}

# On the slice (after smoke_plan): the devices every worker sees, a few records of each split of
# the run's data as every worker reads it (e.g. from the bucket), then the smoke run. The first
# step that fails on a worker stops here with one line: the slice stays up (and billed).
smoke() {
  local probe
  probe="import jax; jax.distributed.initialize(); d, p = jax.device_count(), jax.process_count()"
  probe+="; print('process', jax.process_index(), 'of', p, '-', d, 'devices',"
  probe+=" jax.devices()[0].device_kind)"
  probe+="; assert (d, p) == ($DEVICES, $PROCESSES), 'expected $DEVICES devices, $PROCESSES"
  probe+=" processes for $TYPE'"
  on_all_workers "cd ~/farmer_jax && $(shell_join .venv/bin/python -c "$probe")" ||
    smoke_failed "the device check"
  on_all_workers "cd ~/farmer_jax && $(shell_join .venv/bin/farmer_jax check --config="$CONFIG" \
    --workdir="$WORKDIR" --config.mesh="$MESH" --devices="$DEVICES" --processes="$PROCESSES" \
    --read_records="$SMOKE_RECORDS")" || smoke_failed "reading $SMOKE_RECORDS records of the data"
  on_all_workers "cd ~/farmer_jax && $(shell_join bash launch/tpu_worker.sh fg smoke \
    "$SMOKE_DIR/logs" .venv/bin/farmer_jax train "${SMOKE_ARGS[@]:0:2}" --distributed=auto \
    "${SMOKE_ARGS[@]:2}")" ||
    smoke_failed "the 50 quickstart steps, logs in $SMOKE_DIR/logs/"
  echo "smoke run done: $SMOKE_DIR (summary.json, logs/)"
}

# $1: the smoke step that failed. Says what runs and is billed, and how to go on; exit status 1.
smoke_failed() {
  local started="" next="'$PROG smoke' again"
  case $action in
    up | all) started="; training was not started"
      next="'$PROG train' with the same settings and arguments ('$PROG smoke' checks again)" ;;
    supervise) started="; training was not started"
      next="'$PROG supervise' again (it keeps the ACTIVE slice)" ;;
  esac
  echo "$PROG: smoke failed on $TPU at $1: $WORKERS_FAILED, output above$started. The slice" \
    "stays up and is billed: fix the cause, then $next; or '$PROG delete' to stop paying" >&2
  exit 1
}

# The name of what runs on the workers: train (default), smoke (stop only) or an exec command.
run_name() {
  local name=${1:-train}
  [[ " train $EXEC_CMDS " == *" $name "* || ($name == smoke && $action == stop) ]] ||
    die "'$name' is neither train nor an exec command. Fix: name train (the default) or one" \
      "of: $EXEC_CMDS"
  echo "$name"
}

# exec's output flag --FLAG=VALUE of CMD: VALUE is a file NAME (the result goes to
# WORKDIR/eval/NAME, samples to WORKDIR/samples/NAME) or a gs:// URL. eval writes to a bucket
# itself; fid and sample write on process 0's (worker 0's) disk, under STAGE/out, and COPIES gets
# the pair (that local path, the destination) for the copy afterwards.
exec_output() {
  local task=$1 flag=$2 val=$3 name dest sub=eval
  if [[ $task == sample ]]; then sub=samples; fi
  name=${val##*/}
  if [[ $val == gs://* ]]; then
    dest=$val
  else
    dest=$WORKDIR/$sub/$val
    [[ $val != */* ]] || name=""
  fi
  [[ -n $name && $name != . && $name != .. ]] ||
    die "exec $task: --$flag=$val: on the slice --$flag names a file, NAME (written to" \
      "$WORKDIR/$sub/NAME) or gs://BUCKET/PATH/NAME. Fix: --$flag=NAME"
  RESULTS+=("$dest")
  if [[ $task == eval ]]; then
    EXEC_ARGS+=("--$flag=$dest")
  else
    EXEC_ARGS+=("--$flag=$STAGE/out/$name")
    COPIES+=("$STAGE/out/$name" "$dest")
  fi
}

# exec CMD ARGS, before any cloud call: EXEC_ARGS (ARGS for every worker, with each gs://
# --model (an export directory), --inception and --ref (files) replaced by its copy on the
# worker's disk, STAGE/in/BUCKET/PATH, and the outputs rewritten by exec_output), STAGE_CMDS (the
# copies, run on every worker), COPIES and RESULTS. eval and fid without --out: CMD-TIMESTAMP.json.
exec_args() {
  local task=$1 a flag val path outs=0
  shift
  EXEC_ARGS=() STAGE_CMDS=() COPIES=() RESULTS=()
  for a in "$@"; do
    if [[ $a =~ ^--?(model|inception|ref|out|npz)$ ]]; then
      die "exec $task: $a VALUE: the launcher reads only the one-word form. Fix: $a=VALUE"
    elif [[ $a =~ ^--?(model|inception|ref)=gs://(.*[^/])/*$ ]]; then
      flag=${BASH_REMATCH[1]} val=${BASH_REMATCH[2]}
      [[ /$val/ != */../* && /$val/ != */./* && $val == */* ]] ||
        die "exec $task: --$flag=gs://$val is not gs://BUCKET/PATH. Fix: name the object itself"
      path=$STAGE/in/$val
      if [[ $flag == model ]]; then          # a directory: mirrored, files gone from it removed
        STAGE_CMDS+=("mkdir -p $(shell_join "$path") && $(shell_join gcloud storage rsync -r \
          --delete-unmatched-destination-objects "gs://$val" "$path")")
      else
        STAGE_CMDS+=("mkdir -p $(shell_join "${path%/*}") && $(shell_join gcloud storage cp \
          "gs://$val" "$path")")
      fi
      EXEC_ARGS+=("--$flag=$path")
    elif [[ $a =~ ^--?(out|npz)=(.*)$ && ($task == sample || ${BASH_REMATCH[1]} == out) ]]; then
      exec_output "$task" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}"
      outs=$((outs + 1))
    else
      EXEC_ARGS+=("$a")
    fi
  done
  if ((outs == 0)); then
    [[ $task != sample ]] ||
      die "exec sample: no output named. Fix: --out=NAME.png and/or --npz=NAME.npz (written to" \
        "$WORKDIR/samples/), or gs:// URLs"
    exec_output "$task" out "$task-$(date -u +%Y%m%d-%H%M%S).json"
  fi
}

# exec CMD ARGS: farmer_jax CMD (eval, fid, sample) on every worker in the foreground, as one
# multi-host job (--distributed=auto, the compilation cache), on the run's commit (WORKDIR/
# launch/commit; HEAD when there is none, or with FORCE_COMMIT=1), installed only on workers that
# lack it; inputs staged first, outputs copied from worker 0 after. Fails unless every worker's
# command exits 0.
exec_on_slice() {
  local task=${1:-} want line running=0 lacking=0 remote c out ok=0 i logdir
  if [[ $# -gt 0 ]]; then shift; fi
  if [[ $task == export ]]; then
    die "exec export: export runs on one machine and writes a local directory. Fix: run" \
      "farmer_jax export --workdir=${WORKDIR:-WORKDIR} --out=EXPORT here, then gcloud storage" \
      "cp -r EXPORT gs://BUCKET/exports/ and exec fid|sample|eval" \
      "--model=gs://BUCKET/exports/EXPORT (docs/launch.md)"
  fi
  [[ -n $task && " $EXEC_CMDS " == *" $task "* ]] ||
    die "exec: '$task' is not a command exec runs on the slice. Fix: exec one of: $EXEC_CMDS," \
      "then its flags, e.g. exec fid --model=gs://BUCKET/exports/m --num=50000"
  parse_type
  parse_workdir
  need PROJECT TPU
  need_gcloud
  exec_args "$task" "$@"
  logdir=$WORKDIR/logs/$task

  read_run_commit
  want=$RUN_SHA
  if [[ -z $want || ${FORCE_COMMIT:-0} == 1 ]]; then
    want=$(git -C "$ROOT" rev-parse --verify -q HEAD) || die "$ROOT has no commit"
  fi
  probe_workers
  [[ $DRY_RUN != 1 ]] || echo "# dry run: assuming every worker holds commit $want, installed"
  for line in "${PROBE[@]}"; do
    echo "  $line"
    if [[ $line == *" train=running"* ]]; then running=$((running + 1)); fi
    if [[ $line != *" venv=ok commit=$want" ]]; then lacking=$((lacking + 1)); fi
  done
  ((running == 0)) ||
    die "training runs on $running of $PROCESSES workers of $TPU and holds their chips; nothing" \
      "was run. Fix: wait until it has finished, or '$PROG stop' it, then the same command"
  if ((lacking > 0)); then
    git_head
    [[ $SHIP_SHA == "$want" ]] ||
      die "$lacking of $PROCESSES workers lack the run's commit ${want:0:12}" \
        "($WORKDIR/launch/commit) and this checkout is at ${SHIP_SHA:0:12}; nothing was changed." \
        "Fix: git checkout $want, then the same command (or FORCE_COMMIT=1 to install and run" \
        "${SHIP_SHA:0:12}; the record stays)"
    echo "$lacking of $PROCESSES workers lack commit ${want:0:12} (or its install): installing it"
    install
  fi

  remote="cd ~/farmer_jax && mkdir -p $STAGE/out"
  for c in "${STAGE_CMDS[@]}"; do remote+=" && $c"; done
  # shellcheck disable=SC2016  # expanded by the worker's shell
  remote+=' && echo "farmer_jax-staged $(hostname)"'
  out=$(ssh_to all "$remote") || true
  if [[ $DRY_RUN != 1 ]]; then
    ok=$(grep -o 'farmer_jax-staged [^ ]*' <<<"$out" | wc -l)
    ((ok == PROCESSES)) ||
      die "the inputs reached $ok of $PROCESSES workers (gcloud's errors above); nothing was run." \
        "Fix: check that each gs:// path exists and that the slice's service account can read" \
        "it, then the same command"
  fi

  if ! on_all_workers "cd ~/farmer_jax && $(shell_join bash launch/tpu_worker.sh fg "$task" \
    "$logdir" .venv/bin/farmer_jax "$task" --distributed=auto --compilation_cache_dir="$CACHE" \
    "${EXEC_ARGS[@]}")"; then
    echo "$PROG: exec $task failed on the slice: $WORKERS_FAILED; each worker's log:" \
      "$logdir/worker-I.log ($PROG logs $task, WORKER=I)" >&2
    exit 1
  fi

  if ((${#COPIES[@]} > 0)); then           # process 0 wrote them on worker 0
    remote="cd ~/farmer_jax"
    for ((i = 0; i < ${#COPIES[@]}; i += 2)); do
      remote+=" && $(shell_join gcloud storage cp "${COPIES[i]}" "${COPIES[i + 1]}")"
    done
    if ! ssh_to 0 "$remote"; then
      echo "$PROG: exec $task ran, but copying its output from worker 0 failed (above); it is in" \
        "farmer_jax_stage/out/ in worker 0's home until the slice is deleted: run the copy again" \
        "(gcloud compute tpus tpu-vm ssh $TPU --worker=0 --command='$remote')" >&2
      exit 1
    fi
  fi
  echo "$task done on all $PROCESSES workers of $TPU"
  for c in "${RESULTS[@]}"; do echo "  result: $c"; done
  if [[ $task == fid ]]; then
    c=${COPIES[0]#"$STAGE"/}
    echo "  feature dump: ~/farmer_jax_stage/${c%.json}.features on worker 0 (unless --dump);" \
      "the same --out resumes from it while the slice lives"
  fi
  echo "  logs:   $logdir/worker-I.log ($PROG logs $task, WORKER=I)"
}

logs() {
  local k=${WORKER:-0} n=${TAIL:-50} name sub=""
  name=$(run_name "$@")
  [[ $name == train ]] || sub=$name/
  [[ $k =~ ^[0-9]+$ && $n =~ ^[0-9]+$ ]] || die "WORKER and TAIL must be numbers"
  if [[ -n ${WORKDIR:-} ]]; then
    parse_workdir
    run_cmd gcloud storage cat "$WORKDIR/logs/${sub}worker-$k.log" | tail -n "$n"
  else
    need_zone
    echo "# WORKDIR is not set: reading the live log on the worker (the bucket copy needs WORKDIR)"
    ssh_to "$k" "tail -n $n ~/farmer_jax/$name.log"
  fi
}

status() {
  local what name
  for what in qr tpu; do
    if [[ $what == qr ]]; then name="queued resource $QR_ID"; else name="TPU $TPU"; fi
    if QUERY_TRIES=1 describe "$what" ACTIVE; then
      [[ $STATE != NOT_FOUND ]] || STATE="not found"
      echo "$name: $STATE"
    else
      echo "$name: unknown (the query failed: $QUERY_ERR)"
    fi
  done
  if [[ -n ${WORKDIR:-} ]]; then
    parse_workdir
    if finished; then echo "run finished: $WORKDIR/summary.json"; else echo "run not finished"; fi
  fi
}

delete() {
  delete_qr
  echo "deleted $QR_ID and its TPU $TPU; the bucket (checkpoints, logs) is untouched"
}

# Settings every paid action checks before its first command; $1: ship (also check git) or no.
preflight() {
  local ship=$1
  shift
  parse_type
  parse_workdir
  need PROJECT TPU CONFIG
  if [[ $ship == ship ]]; then git_head; fi
  need_gcloud
  check_local --config="$CONFIG" --workdir="$WORKDIR" --config.mesh="$MESH" "$@"
  if [[ $ship == ship ]]; then check_run_commit; fi
}

# Asks every worker whether training runs, whether it has ~/farmer_jax/.venv and which commit
# ~/farmer_jax holds: PROBE gets one line per worker, "HOST train=running|stopped venv=ok|missing
# commit=SHA" (commit=none before an install). Stops unless every worker answered. DRY_RUN=1:
# prints the ssh, PROBE stays empty.
probe_workers() {
  local probe out
  # shellcheck disable=SC2016  # expanded by the worker's shell
  probe='d=$HOME/farmer_jax; r=stopped; v=ok; p=$(cat "$d/train.pid" 2>/dev/null) &&'
  # shellcheck disable=SC2016
  probe+=' kill -0 "$p" 2>/dev/null && r=running; [ -x "$d/.venv/bin/farmer_jax" ] || v=missing;'
  # shellcheck disable=SC2016
  probe+=' c=$(cat "$d/COMMIT" 2>/dev/null) || c=none;'
  # shellcheck disable=SC2016
  probe+=' echo "farmer_jax-probe $(hostname) train=$r venv=$v commit=$c"'
  PROBE=()
  out=$(ssh_to all "$probe") ||
    die "could not ask every worker of $TPU what runs there; nothing was changed"
  [[ $DRY_RUN != 1 ]] || return 0
  mapfile -t PROBE < <(grep '^farmer_jax-probe ' <<<"$out" | cut -d ' ' -f 2- || true)
  ((${#PROBE[@]} == PROCESSES)) ||
    die "$TPU: ${#PROBE[@]} of $PROCESSES workers answered; nothing was changed. Run the same" \
      "command again"
}

# On a READY slice: nothing if training runs on every worker; otherwise a partial restart could not
# join the multi-host jax.distributed job, so stop it on ALL workers (SIGTERM, wait for the exit),
# install if a worker lacks ~/farmer_jax/.venv (a repaired host), and start it on all together.
restart_training() {
  local line running=0 missing=0 halt
  probe_workers
  for line in "${PROBE[@]}"; do
    echo "  $line"
    if [[ $line == *" train=running"* ]]; then running=$((running + 1)); fi
    if [[ $line == *" venv=missing"* ]]; then missing=$((missing + 1)); fi
  done
  if ((running == PROCESSES)); then
    echo "training runs on all $PROCESSES workers of $TPU; nothing to resume"
    return 0
  fi
  if ((running > 0)); then
    echo "training runs on $running of $PROCESSES workers: a partial restart cannot join the" \
      "multi-host job; stopping it on every worker, then starting it on all"
    halt="if [ -f ~/farmer_jax/launch/tpu_worker.sh ]; then cd ~/farmer_jax &&"
    halt+=" bash launch/tpu_worker.sh stop train $(shell_join "${STOP_WAIT_S:-300}"); fi"
    ssh_to all "$halt"
  fi
  if ((missing > 0)); then
    echo "$missing worker(s) have no ~/farmer_jax/.venv (a new or repaired host): installing"
    install
  fi
  train start "$@"
}

resume() {
  preflight ship "$@"
  if finished; then
    echo "$WORKDIR/summary.json exists: the run has finished, nothing to resume"
    return 0
  fi
  resume_slice "$@"
}

# Deletes or recreates the slice only when the queued resource is SUSPENDING, SUSPENDED, FAILED or
# gone, or its TPU is PREEMPTED or TERMINATED; stops on any state it cannot read.
resume_slice() {
  local qr tpu=""
  [[ $DRY_RUN != 1 ]] || echo "# dry run: assuming a Spot preemption (queued resource SUSPENDED)"
  must_describe qr SUSPENDED
  qr=$STATE
  if [[ $qr == ACTIVE ]]; then
    must_describe tpu READY
    tpu=$STATE
  fi
  echo "queued resource $QR_ID: $qr${tpu:+; TPU $TPU: $tpu}"
  case $qr in
    ACTIVE)
      case $tpu in
        READY) restart_training "$@"; return 0 ;;
        PREEMPTED | TERMINATED) delete_qr; create ;;
        CREATING | STARTING | RESTARTING | REPAIRING)
          die "TPU $TPU is $tpu; run resume again once it is READY" ;;
        *) die "TPU $TPU is $tpu (queued resource ACTIVE); not touching it. See 'gcloud compute" \
             "tpus tpu-vm describe $TPU --zone=$ZONE'; '$PROG delete' then resume recreates it" ;;
      esac ;;
    NOT_FOUND) create ;;
    SUSPENDED)                                 # Spot preemption: its TPU is already deleted
      if ! run_cmd gcloud compute tpus queued-resources reset "$QR_ID" --project="$PROJECT" \
        --zone="$ZONE"; then
        echo "$PROG: reset of $QR_ID failed; deleting and recreating it" >&2
        delete_qr
        create
      fi
      wait_active ;;
    SUSPENDING | FAILED) delete_qr; create ;;
    ACCEPTED | PROVISIONING | WAITING_FOR_RESOURCES | CREATING) wait_active ;;
    *) die "queued resource $QR_ID is $qr; not touching it. Run resume again later, or see" \
         "'gcloud compute tpus queued-resources describe $QR_ID --zone=$ZONE'" ;;
  esac
  install
  train start "$@"
}

# up's and supervise's first launch (after preflight): create, install, smoke (checked locally
# before create; SKIP_SMOKE=1: none), then training with $@.
first_launch() {
  if [[ ${SKIP_SMOKE:-0} != 1 ]]; then smoke_plan; fi
  create
  install
  if [[ ${SKIP_SMOKE:-0} != 1 ]]; then smoke; else echo "SKIP_SMOKE=1: no smoke run"; fi
  train start "$@"
}

# One step of `supervise`, run as a process of its own (a refusal or a failed command ends the
# step, not the supervisor). Exit status: 0 training runs on every worker, 3 training was
# (re)started, 4 the run has finished and the slice is deleted; anything else: the step failed.
poll() {
  parse_type
  parse_workdir
  need PROJECT TPU CONFIG
  need_gcloud
  check_run_commit                             # supervise's commit (SHIP_SHA), or HEAD
  if finished; then
    must_describe qr ACTIVE
    if [[ $STATE != NOT_FOUND ]]; then delete_qr; fi
    echo "$WORKDIR/summary.json exists: the run has finished; queued resource $QR_ID and its" \
      "TPU are deleted (the bucket is kept)"
    exit 4
  fi
  resume_slice "$@"
  if ((STARTED)); then exit 3; fi
}

# smoke, train, then every SUPERVISE_POLL_S: resume whatever a preemption took (the slice, or the
# training on its workers), and delete the slice once WORKDIR/summary.json exists. Gives up (and
# deletes the slice, unless SUPERVISE_KEEP=1) when training needed more than MAX_RESTARTS restarts
# (a crash loop) or after MAX_FAILS failed steps in a row.
supervise() {
  local rc restarts=0 fails=0 max_restarts=${MAX_RESTARTS:-20} max_fails=${MAX_FAILS:-5} why
  preflight ship "$@"
  export SHIP_SHA                              # every step ships this commit, wherever HEAD goes
  if [[ -z $RUN_SHA ]] && ! finished; then first_launch "$@"; fi
  while :; do
    pause "${SUPERVISE_POLL_S:-300}"
    echo "$(date -u +%H:%M:%SZ) supervise: checking $QR_ID and $WORKDIR"
    rc=0
    bash "$ROOT/launch/tpu_vm.sh" poll "$@" || rc=$?
    case $rc in
      0) fails=0 ;;
      3) fails=0; restarts=$((restarts + 1))
        echo "supervise: training restarted (restart $restarts; MAX_RESTARTS=$max_restarts)" ;;
      4) return 0 ;;
      *) fails=$((fails + 1))
        echo "supervise: the step failed (exit status $rc, above); $fails of $max_fails" \
          "failures in a row" >&2 ;;
    esac
    why=""
    if ((restarts > max_restarts)); then why="more than $max_restarts restarts (MAX_RESTARTS)"; fi
    if ((fails >= max_fails)); then why="$fails failed steps in a row (MAX_FAILS)"; fi
    if [[ -n $why ]]; then
      if [[ ${SUPERVISE_KEEP:-0} == 1 ]]; then
        die "supervise: giving up after $why; SUPERVISE_KEEP=1: the slice is kept (and billed)"
      fi
      echo "$PROG: supervise: giving up after $why; deleting $QR_ID so that it stops billing" \
        "(checkpoints and logs stay in $WORKDIR)" >&2
      delete_qr || true
      exit 1
    fi
    if [[ $DRY_RUN == 1 ]]; then
      echo "# dry run: one supervision step shown"
      return 0
    fi
  done
}

action=${1:-}
if [[ $# -gt 0 ]]; then shift; fi
case $action in
  up | all) preflight ship "$@"; first_launch "$@" ;;
  check) parse_type; parse_workdir; need CONFIG
    check_local --config="$CONFIG" --workdir="$WORKDIR" --config.mesh="$MESH" "$@" ;;
  create) preflight no "$@"; create ;;
  install) need_zone; need_gcloud
    if [[ -n ${WORKDIR:-} ]]; then parse_workdir; check_run_commit; fi
    install ;;
  train | run) need_zone; parse_workdir; need CONFIG; need_gcloud; train start "$@" ;;
  smoke) parse_type; parse_workdir; need PROJECT TPU CONFIG; need_gcloud; smoke_plan "$@"; smoke ;;
  logs) logs "$@" ;;
  exec) exec_on_slice "$@" ;;
  status) need_zone; status ;;
  stop) need_zone; name=$(run_name "$@")
    ssh_to all "cd ~/farmer_jax && bash launch/tpu_worker.sh stop $name" ;;
  resume) resume "$@" ;;
  supervise) supervise "$@" ;;
  poll) poll "$@" ;;
  delete) need_zone; need_gcloud; delete ;;
  "" | -h | --help | help) usage; exit 2 ;;
  *) usage; die "unknown action '$action'" ;;
esac
