"""The CLI's failure contract: a bad value is refused before any work or file is written, with ONE
line ``farmer_jax <cmd>: <message naming the value>`` as the last line on stderr and exit code 2.

The table of bad invocations runs the real CLI (``farmer_jax.cli.run``, the console script's entry)
in ONE subprocess: it imports the package once, then forks a fresh child per case (absl flags are
process-global), with the child's stdout/stderr in files and a snapshot of the watched directories
before and after each case. The pure pieces (sampler flag parsing, output-path checks, atomic
writes, non-finite samples, failure classification) are tested in-process below.
"""

import errno
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from farmer_jax import cli
from farmer_jax.commands import exits, sampler_flags
from farmer_jax.config.schema import SamplerConfig
from farmer_jax.errors import ConfigError, UserError
from farmer_jax.sampling import generate as gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "farmer_jax", "configs", "quickstart.py")  # by path; ok_check: name

DRIVER = r'''
import json, os, sys, traceback
import jax, orbax.checkpoint  # the expensive imports, once, before forking
import farmer_jax.cli, farmer_jax.config, farmer_jax.artifacts.export, farmer_jax.sampling.generate
import farmer_jax.train.trainer

def snapshot(dirs):
  out = {}
  for d in dirs:
    for base, subdirs, files in os.walk(d):
      for name in subdirs + files:
        p = os.path.join(base, name)
        st = os.lstat(p)
        out[p] = [st.st_size, st.st_mtime_ns]
  return out

cases, outdir = json.load(open(sys.argv[1])), sys.argv[2]
report = {}
for case in cases:
  before = snapshot(case["watch"])
  err, out = os.path.join(outdir, case["id"] + ".err"), os.path.join(outdir, case["id"] + ".out")
  pid = os.fork()
  if pid == 0:
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    code = 0
    try:
      farmer_jax.cli.run(["farmer_jax"] + case["args"])
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  _, status = os.waitpid(pid, 0)
  after = snapshot(case["watch"])
  changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
  report[case["id"]] = {"rc": os.waitstatus_to_exitcode(status), "stderr": open(err).read(),
                        "stdout": open(out).read(), "changed": changed}
print("REPORT " + json.dumps(report))
'''


def run_cli_cases(cases, tmp):
  """cases: [{'id', 'args', 'watch': [dirs]}] -> {id: {'rc', 'stderr', 'stdout', 'changed'}} (one
  subprocess)."""
  spec = tmp / "cases.json"
  spec.write_text(json.dumps(cases))
  logs = tmp / "logs"
  logs.mkdir()
  r = subprocess.run(
      [sys.executable, "-c", DRIVER, str(spec), str(logs)],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  line = [ln for ln in r.stdout.splitlines() if ln.startswith("REPORT ")][-1]
  return json.loads(line[len("REPORT "):])


@pytest.fixture(scope="module")
def bad_cli(exported, tmp_path_factory):
  """Every case of BAD_CASES run once; returns (results, paths)."""
  _, model, _, _ = exported
  base = tmp_path_factory.mktemp("cli")
  work = base / "work"  # everything a case could write lives under here (and the export)
  work.mkdir()
  (work / "a_file").write_text("not a directory")
  (work / "raises.py"
  ).write_text("def get_config(arg=None):\n  raise RuntimeError('no preset called ' + repr(arg))\n")
  paths = {"W": str(work), "M": str(model), "Q": QUICKSTART}
  cases = [{"id": cid, "args": [a.format(**paths) for a in args], "watch": [str(work), str(model)]}
           for cid, _, args, _ in BAD_CASES]
  cases.append({
      "id":
          "ok_sample",
      "watch": [str(work), str(model)],
      "args": [
          "sample", f"--model={model}", "--classes=3", "--num=2", "--batch=2", "--cfg=0",
          "--sampler=s_c=5,t_sigma=0.9", f"--out={work}/ok.png", f"--npz={work}/ok.npz", "--quiet"
      ]
  })
  cases.append({   # check takes train's command line as is (launch/tpu_vm.sh passes it)
      "id": "ok_check",
      "watch": [str(work)],
      "args": ["check", "--config=quickstart:tiny", f"--workdir={work}/run", "--devices=1",
               "--config_change_ok", "--distributed=auto", "--config.train.steps=3"]
  })
  return run_cli_cases(cases, base), paths


TRAIN = ["train", "--config={Q}:tiny", "--workdir={W}/run"]
# (case id, command, argv, substrings the one-line message must contain)
BAD_CASES = [
    ("missing_config", "train", ["train", "--config={W}/nope.py", "--workdir={W}/run"],
     ["--config={W}/nope.py: cannot load the config file", "No such file", "Fix:"]),
    ("check_missing_config", "check", ["check", "--config={W}/nope.py", "--workdir={W}/run"],
     ["--config={W}/nope.py: cannot load the config file", "No such file", "Fix:"]),
    ("distill_missing_config", "distill",
     ["distill", "--config={W}/nope.py", "--workdir={W}/s", "--teacher={M}"],
     ["--config={W}/nope.py: cannot load the config file", "No such file", "Fix:"]),
    ("unknown_config_name", "train", ["train", "--config=quickstrt:tiny", "--workdir={W}/run"],
     ["--config=quickstrt:tiny: cannot load the config file", "No such file",
      "Fix: pass a shipped config (imagenet256, quickstart, tarflow)", "--config=quickstart"]),
    ("config_raises", "train", ["train", "--config={W}/raises.py:big", "--workdir={W}/run"],
     ["--config={W}/raises.py:big", "RuntimeError: no preset called 'big'"]),
    ("bad_config_arg", "train", ["train", "--config={Q}:bogus=1", "--workdir={W}/run"],
     ["--config={Q}:bogus=1", "unknown config arg 'bogus'", "Fix:"]),
    ("unknown_model_key", "train", TRAIN + ["--config.model.flow_blockz=3"], [
        "--config.model.flow_blockz", "config.model has no field 'flow_blockz'",
        'Did you mean "flow_blocks" instead of "flow_blockz"?'
    ]),
    ("untyped_override", "train", TRAIN + ["--config.train.steps=abc"],
     ["--config.train.steps=abc"]),
    ("ckpt_keep", "train", TRAIN + ["--config.train.ckpt_keep=0"],
     ["config.train.ckpt_keep=0 is invalid", "Fix:"]),
    ("log_every", "train", TRAIN + ["--config.train.log_every=0"],
     ["config.train.log_every=0 is invalid", "Fix:"]),
    ("ema_decay", "train", TRAIN + ["--config.train.ema_decay=1.0"],
     ["config.train.ema_decay=1.0 is invalid", "[0, 1)"]),
    ("workdir_is_file", "train", ["train", "--config={Q}:tiny", "--workdir={W}/a_file"],
     ["--workdir={W}/a_file is invalid: it is an existing file"]),
    ("no_workdir", "train", ["train", "--config={Q}:tiny"], ["--workdir is required"]),
    ("export_no_run", "export", ["export", "--workdir={W}/norun", "--out={W}/exp"], ["{W}/norun"]),
    ("export_negative_step", "export",
     ["export", "--workdir={W}/norun", "--out={W}/exp", "--step=-1"],
     ["--step=-1: a checkpoint step is >= 0", "Fix:"]),
    ("sample_gif", "sample", ["sample", "--model={M}", "--out={W}/x.gif"],
     ["--out={W}/x.gif: unsupported file type '.gif'", "*.png"]),
    ("sample_npz_no_dir", "sample", ["sample", "--model={M}", "--npz={W}/missing/s.npz"],
     ["--npz={W}/missing/s.npz: the directory {W}/missing does not exist"]),
    ("sample_s_c_fraction", "sample",
     ["sample", "--model={M}", "--sampler=s_c=2.5",
      "--out={W}/x.png"], ["s_c=2.5 must be an integer"]),
    ("sample_cfg_nan", "sample", ["sample", "--model={M}", "--cfg=nan",
                                  "--out={W}/x.png"], ["cfg=nan must be a finite number"]),
    ("sample_num_zero", "sample", ["sample", "--model={M}", "--num=0",
                                   "--out={W}/x.png"], ["--num=0 must be >= 1"]),
    # checked before the model is even looked at: a missing model is not what is reported
    ("sample_out_before_load", "sample", ["sample", "--model={W}/no_model", "--out={W}/x.jpg"],
     ["--out={W}/x.jpg: unsupported file type '.jpg'"]),
    # after loading (orbax ran): the message is still the one last line
    ("sample_class_after_load", "sample",
     ["sample", "--model={M}", "--classes=12", "--out={W}/x.png"], ["class id 12 is out of range"]),
    ("eval_both", "eval", ["eval", "--model={M}", "--workdir={W}/run"],
     ["pass exactly one of --workdir"]),
    ("eval_dequant_zero", "eval", ["eval", "--model={M}", "--dequant_samples=0"],
     ["--dequant_samples=0 must be >= 1"]),
    ("eval_bad_split", "eval", ["eval", "--model={M}", "--split=val"],
     ["--split=val: mnist5k has no (non-empty) split 'val'", "['test', 'train']", "Fix:"]),
    ("eval_out_txt", "eval", ["eval", "--model={M}", "--out={W}/r.txt"], ["*.json"]),
    ("eval_no_model", "eval", ["eval", "--model={W}/nope"], ["{W}/nope does not exist"]),
    ("fid_no_inception", "fid", ["fid", "--model={M}", "--num=10"], ["--inception is required"]),
    ("fid_missing_ref", "fid",
     ["fid", "--model={M}", "--inception={W}/a_file", "--ref={W}/nope.npz", "--num=10"],
     ["--ref={W}/nope.npz does not exist", "nothing is downloaded"]),
    ("fid_num_one", "fid", ["fid", "--model={M}", "--features=mnist", "--num=1"],
     ["--num=1 must be >= 2"]),
    ("fid_bad_ref_split", "fid",
     ["fid", "--model={M}", "--features=mnist", "--num=10", "--ref=split:val"],
     ["--ref=split:val: mnist5k has no (non-empty) split 'val'", "['test', 'train']"]),
    ("fid_bad_weights", "fid",
     ["fid", "--model={M}", "--inception={W}/a_file", "--ref=split:test", "--num=10"],
     ["{W}/a_file"]),
    ("fid_bad_cfg", "fid", ["fid", "--model={M}", "--features=mnist", "--cfg=-1"],
     ["cfg=-1"]),
    ("fid_out_in_a_bucket", "fid",
     ["fid", "--model={M}", "--features=mnist", "--num=10", "--out=gs://b/fid.json"],
     ["--out=gs://b/fid.json: fid writes its result", "Fix: a local path"]),
    ("convert_no_direction", "convert", ["convert", "--ckpt={W}/a_file", "--out={W}/m"],
     ["pass --from=tarflow --ckpt=FILE --out=EXPORT_DIR, or --to=tarflow"]),
    ("convert_missing_ckpt", "convert",
     ["convert", "--from=tarflow", "--ckpt={W}/nope.pth", "--out={W}/m"],
     ["--ckpt={W}/nope.pth does not exist"]),
    ("convert_not_a_checkpoint", "convert",
     ["convert", "--from=tarflow", "--ckpt={W}/a_file", "--out={W}/m"], ["{W}/a_file"]),
    ("convert_onto_export", "convert",
     ["convert", "--from=tarflow", "--ckpt={W}/a_file", "--out={M}"], ["already exists"]),
    ("convert_farmer_to_tarflow", "convert",
     ["convert", "--to=tarflow", "--model={M}", "--out={W}/t.pth"],
     ["flow_final_norm", "cannot be written as a TARFlow checkpoint"]),
    ("convert_to_bad_suffix", "convert",
     ["convert", "--to=tarflow", "--model={M}", "--out={W}/t.bin"], [".pt (PyTorch) or .npz"]),
    ("convert_both_directions", "convert",
     ["convert", "--from=tarflow", "--to=tarflow", "--ckpt={W}/a_file", "--out={W}/m"],
     ["pass --from=tarflow --ckpt=FILE --out=EXPORT_DIR, or --to=tarflow"]),
    ("convert_ckpt_is_a_directory", "convert",
     ["convert", "--from=tarflow", "--ckpt={M}", "--out={W}/m"], ["is not a file"]),
    ("convert_bad_noise_std", "convert",
     ["convert", "--from=tarflow", "--ckpt={W}/a_file", "--noise_std=-1", "--out={W}/m"],
     ["--noise_std=-1.0 must be a finite number > 0"]),
    ("convert_to_with_from_flags", "convert",
     ["convert", "--to=tarflow", "--model={M}", "--ckpt={W}/a_file", "--out={W}/t.pth"],
     ["--ckpt does not apply to convert --to=tarflow"]),
    # a flag of another command is refused (named with the commands that take it), as is an
    # unknown one and a --config override where the command takes no --config
    ("export_foreign_flag", "export",
     ["export", "--workdir={W}/norun", "--out={W}/exp", "--cfg=3", "--teacher=x"],
     ["unknown flag --cfg (a flag of: sample, fid)", "Fix:", "farmer_jax export --help"]),
    ("sample_foreign_bool", "sample", ["sample", "--model={M}", "--out={W}/x.png", "--nooverwrite"],
     ["unknown flag --nooverwrite (a flag of: export, score, prepare, convert)"]),
    ("export_config_override", "export",
     ["export", "--workdir={W}/norun", "--out={W}/exp", "--config.train.steps=3"],
     ["unknown flag --config.train.steps (a flag of: train, distill, check, convert)"]),
    ("unknown_flag", "eval", ["eval", "--model={M}", "--splitz=test"],
     ["Unknown command line flag 'splitz'", "Fix: see farmer_jax eval --helpfull"]),
    ("convert_from_with_export_flag", "convert",
     ["convert", "--from=tarflow", "--ckpt={W}/a_file", "--dtype=bfloat16", "--out={W}/m"],
     ["unknown flag --dtype (a flag of: export)"]),
    ("sample_af_guidance_with_jacobi", "sample",
     ["sample", "--model={M}", "--inverse=jacobi", "--sampler=af_guidance=2", "--out={W}/x.png"],
     ["af_guidance=2", "inverse='jacobi'"]),
]


@pytest.mark.parametrize(
    "cid,cmd,expect", [(c, cmd, e) for c, cmd, _, e in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_bad_cli_input_one_line_exit_2_nothing_written(bad_cli, cid, cmd, expect):
  results, paths = bad_cli
  r = results[cid]
  err = r["stderr"]
  lines = [ln for ln in err.splitlines() if ln.strip()]
  assert r["rc"] == 2, err[-3000:]
  assert lines and lines[-1].startswith(f"farmer_jax {cmd}: "), err[-3000:]
  assert len([ln for ln in lines if ln.startswith("farmer_jax")
             ]) == 1 and "Traceback" not in err, err[-3000:]
  for text in expect:
    assert text.format(**paths) in lines[-1], (text.format(**paths), lines[-1])
  assert r["changed"] == [], f"the filesystem changed: {r['changed']}"
  assert r["stdout"] == ""


def test_cli_control_sample_succeeds(bad_cli):
  """The same harness runs a good command: integer sampler counts from --sampler are accepted
  (s_c=5), both outputs appear and no temporary file is left."""
  results, paths = bad_cli
  r = results["ok_sample"]
  assert r["rc"] == 0, r["stderr"][-3000:]
  assert "2 samples (none, w=0.0)" in r["stdout"]
  work = paths["W"]
  assert sorted(
      p for p in os.listdir(work) if p.startswith("ok") or ".tmp-" in p) == ["ok.npz", "ok.png"]
  assert np.load(os.path.join(work, "ok.npz"))["arr_0"].shape == (2, 32, 32, 1)
  assert all(
      p.startswith(work) for p in r["changed"]), "the export must not be modified by sampling"


def test_cli_control_check_takes_train_flags(bad_cli):
  results, _ = bad_cli
  r = results["ok_check"]
  assert r["rc"] == 0, r["stderr"][-3000:]
  assert r["stdout"].startswith("config OK: 64 tokens of d=16") and r["changed"] == []


# --------------------------------------------------------------------------------------- in-process

# every command's flags: a flag not listed for a command is refused by it
FLAGS_OF = {
    "train": "config workdir config_change_ok distributed coordinator_address num_processes "
             "process_id compilation_cache_dir",
    "distill": "config teacher workdir config_change_ok distributed coordinator_address "
               "num_processes process_id compilation_cache_dir",
    "export": "workdir out step dtype student overwrite",
    "sample": "model classes num cfg inverse guidance sampler seed batch out npz distributed "
              "coordinator_address num_processes process_id compilation_cache_dir",
    "eval": "workdir model split dequant_samples batch data_dir seed out distributed "
            "coordinator_address num_processes process_id compilation_cache_dir",
    "fid": "model num features inception ref cfg inverse guidance sampler seed batch out dump "
           "distributed coordinator_address num_processes process_id compilation_cache_dir",
    "prepare": "folder data_dir name image_size val_fraction val_folder channels encoding quality "
               "workers overwrite",
    "check": "devices processes compile topology num_slices programs distill mfu price out "
             "read_records config workdir config_change_ok distributed coordinator_address "
             "num_processes process_id compilation_cache_dir",
    "convert": "from to ckpt ckpt_key model out config pixels noise_std channels overwrite",
}


@pytest.mark.parametrize("cmd", list(FLAGS_OF))
def test_command_help_lists_only_its_own_flags(cmd, capsys):
  """``farmer_jax <cmd> --help`` (and -h, --helpfull) prints the command's purpose, an example and
  exactly its flags (plus --quiet/--verbose/--debug), and exits 0."""
  outs = []
  for flag in ("--help", "-h", "--helpfull"):
    with pytest.raises(SystemExit) as e:
      cli.run(["farmer_jax", cmd, "--workdir=/x", flag])
    assert e.value.code == 0
    outs.append(capsys.readouterr().out)
  assert outs[0] == outs[1] == outs[2]
  out = outs[0]
  assert out.startswith(f"farmer_jax {cmd}: ") and f"\nexample: farmer_jax {cmd} --" in out
  listed = re.findall(r"^  --(?:\[no\])?(\w+)", out, re.M)
  assert listed == FLAGS_OF[cmd].split() + ["quiet", "verbose", "debug"]
  assert max(len(line) for line in out.splitlines()[2:]) <= 100


def test_sample_help_shows_cfg_not_teacher(capsys):
  with pytest.raises(SystemExit):
    cli.run(["farmer_jax", "sample", "--help"])
  out = capsys.readouterr().out
  assert "  --cfg (default" not in out and "\n  --cfg\n      Guidance scale w" in out
  assert "--teacher" not in out and "--dtype" not in out


def test_foreign_flag_names_the_commands_that_take_it():
  assert cli.owners("cfg", "export") == ["sample", "fid"]
  assert cli.owners("teacher", "export") == ["distill"]
  assert cli.owners("nooverwrite", "sample") == ["export", "score", "prepare", "convert"]
  assert cli.owners("config.model.prior", "sample") == ["train", "distill", "check", "convert"]
  assert cli.owners("bogus", "sample") == []
  argv = ["farmer_jax export", "--cfg=3"]
  e = flags.UnrecognizedFlagError("cfg", "3")
  assert exits.flag_error_message(e, argv, lambda n: cli.owners(n, "export")) == (
      "unknown flag --cfg (a flag of: sample, fid). Fix: drop it; farmer_jax export --help lists "
      "the flags of export")


def test_usage_and_unknown_command(capsys):
  for argv, code in ((["farmer_jax"], 2), (["farmer_jax", "--help"], 0),
                     (["farmer_jax", "help"], 0)):
    with pytest.raises(SystemExit) as e:
      cli.run(argv)
    assert e.value.code == code
    out = capsys.readouterr().out
    assert out.startswith("usage: farmer_jax <command> [--flags]\ncommands: train, distill, "
                          "export, sample, eval, score, fid, prepare, check, convert\n")
  with pytest.raises(SystemExit) as e:
    cli.run(["farmer_jax", "bogus", "--help"])
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      "farmer_jax: unknown command 'bogus'; commands: train, distill, export, sample, eval, score, "
      "fid, prepare, check, convert (farmer_jax --help)\n")



def test_sampler_flag_values_keep_integers():
  over = sampler_flags.sampler_overrides(None, None,
                                         "s_c=5,s_u=3,t_sigma=0.9,redundant_var_scale=1")
  assert over == {"s_c": 5, "s_u": 3, "t_sigma": 0.9, "redundant_var_scale": 1}
  assert isinstance(over["s_c"], int)
  s = SamplerConfig.from_config({**over, "guidance": "resampling"})
  assert (s.cfg.s_c, s.cfg.s_u) == (5, 3)
  for bad, msg in [("s_c=2.5", "s_c=2.5 must be an integer"),
                   ("redundant_candidates=16.5", "must be an integer"),
                   ("redundant_candidates=true", "is not a number")]:
    with pytest.raises(UserError, match=msg):
      SamplerConfig.from_config(sampler_flags.sampler_overrides(None, None, bad))
  with pytest.raises(UserError, match="unknown setting 'temp'"):
    sampler_flags.sampler_overrides(None, None, "temp=1")
  with pytest.raises(UserError, match="must be key=value"):
    sampler_flags.sampler_overrides(None, None, "s_c")
  with pytest.raises(UserError, match="cfg=nan must be a finite number"):
    SamplerConfig.from_config(sampler_flags.sampler_overrides(float("nan"), None, None))
  with pytest.raises(UserError, match="cfg=inf must be a finite number"):
    SamplerConfig.from_config(sampler_flags.sampler_overrides(float("inf"), None, None))
  assert sampler_flags.sampler_overrides(2.0, None, "guidance=naive")["guidance"] == "naive"
  assert SamplerConfig.from_config(sampler_flags.sampler_overrides(None, None,
                                                   "naive_proposals=1e3")).naive_proposals == 1000


def test_output_paths_checked_before_sampling(tmp_path):
  (tmp_path / "dir.png").mkdir()
  ok = [("--out", "a.png"), ("--out", "A.PNG"), ("--npz", "s.npz")]
  for flag, name in ok:
    gen.check_output_path(str(tmp_path / name), flag)
  bad = [("--out", "x.gif",
          r"file type '.gif'; --out writes a lossless PNG grid only. Fix: name it \*.png"),
         ("--out", "x.jpg", r"'.jpg'"), ("--out", "noext", r"\(no extension\)"),
         ("--npz", "s.npy", r"--npz=.*s.npy: unsupported file type '.npy'.*\*.npz"),
         ("--out", "dir.png", r"dir.png is a directory"),
         ("--npz", "missing/s.npz", r"the directory .*missing does not exist")]
  for flag, name, msg in bad:
    with pytest.raises(UserError, match=msg):
      gen.check_output_path(str(tmp_path / name), flag)
  assert sorted(os.listdir(tmp_path)) == ["dir.png"]


def test_writes_are_atomic_and_leave_no_temporaries(tmp_path, monkeypatch):
  images = np.zeros((2, 3, 4, 4, 1), np.uint8)
  labels = np.zeros((2, 3), np.int32)
  png, npz = str(tmp_path / "g.png"), str(tmp_path / "g.npz")

  def disk_full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(gen.np, "savez", disk_full)
  with pytest.raises(OSError, match="No space left"):
    gen.write_outputs(images, labels, png, npz)
  assert os.listdir(
      tmp_path) == [], "all or nothing: no PNG without its .npz, and no temporary file"
  monkeypatch.undo()
  gen.write_outputs(images, labels, png, npz, {"ess": np.ones(6)})
  assert sorted(os.listdir(tmp_path)) == ["g.npz", "g.png"]
  assert np.load(npz)["arr_0"].shape == (6, 4, 4, 1)
  with pytest.raises(
      ValueError, match="unsupported file type"):  # refused before the PNG is replaced
    gen.write_outputs(images + 1, labels, png, str(tmp_path / "g.txt"))
  assert sorted(os.listdir(tmp_path)) == ["g.npz", "g.png"]


def test_non_finite_samples_are_an_error_not_black_pixels(tiny, tmp_path, monkeypatch):
  """(Finite samples pass the same check: test_export's generate test and the CLI control above.)"""
  cfg, _, params = tiny
  monkeypatch.chdir(tmp_path)
  nan_params = jax.tree.map(lambda a: a * np.nan, params)
  with pytest.raises(
      ValueError,
      match=r"2 of 2 samples \(samples 0..1 of 4\) are not finite \(NaN/inf\); "
      r"sampling stopped and nothing was written"):
    gen.generate(cfg, nan_params, [0, 1], 2, SamplerConfig(), seed=0, batch_size=2, progress=False)
  assert os.listdir(tmp_path) == []


def test_failure_classification():
  """Expected failures -> (exit code, one line); anything else is a bug (None: re-raised with its
  traceback)."""
  def raised_here(e):
    try:
      raise e
    except Exception as caught:  # noqa: BLE001
      return caught

  from farmer_jax.config.parse import validate_workdir
  try:
    validate_workdir("")
  except ConfigError as e:
    assert exits.failure(e) == (2, str(e))
  try:
    gen.check_output_path("x.gif", "--out")  # a UserError raised by our own validation
  except ValueError as e:
    assert exits.failure(e)[0] == 2
  assert exits.failure(raised_here(
      ValueError("inside a library"))) is None  # not raised by farmer_jax: a bug
  from farmer_jax.conventions import pixel_mapping
  with pytest.raises(ValueError) as bug:   # an invariant of ours (config refuses it first): a bug
    pixel_mapping("nope")
  assert exits.failure(bug.value) is None
  assert exits.failure(raised_here(RuntimeError("bug"))) is None
  assert exits.failure(raised_here(KeyError("k"))) is None
  code, msg = exits.failure(
      raised_here(OSError(errno.ENOSPC, "No space left on device", "/x/ckpt")))
  assert code == 2 and msg.startswith("disk full: [Errno 28] No space left on device: '/x/ckpt'")
  code, msg = exits.failure(raised_here(PermissionError(errno.EACCES, "Permission denied", "/x")))
  assert code == 2 and "Permission denied: '/x'" in msg
  assert exits.failure(raised_here(FloatingPointError("non-finite loss at step 3")))[0] == 1
  from farmer_jax.artifacts.export import ExportError
  from farmer_jax.artifacts.lock import WorkdirBusyError
  assert exits.failure(raised_here(
      ExportError("/m is not a complete export"))) == (2, "/m is not a complete export")
  assert exits.failure(raised_here(WorkdirBusyError("held by pid 7")))[0] == 2
  assert exits.one_line("a\n  b\tc\n") == "a b c"


def test_flag_error_messages_keep_the_suggestion():
  argv = ["farmer_jax train", f"--config={QUICKSTART}:tiny", "--config.model.flow_blockz=3"]
  e = AttributeError(
      KeyError("'flow_blockz'\nDid you mean \"flow_blocks\" instead of \"flow_blockz\"?"))
  msg = exits.flag_error_message(e, argv)
  assert msg.startswith(
      "--config.model.flow_blockz: config.model has no field 'flow_blockz'. Did you mean "
      "\"flow_blocks\" instead of \"flow_blockz\"?"), msg
  e = ValueError(
      "flag --config=x.py: Error whilst parsing config file:\n\nTraceback ...\n  File ...\n"
      "ValueError: quickstart size must be 'base' or 'tiny', got 'huge'\n")
  assert ("the config file raised ValueError: quickstart size must be 'base' or 'tiny'"
          in exits.flag_error_message(e, argv))


def test_a_bucket_compilation_cache_is_refused_on_gpus(monkeypatch, tmp_path):
  """On a GPU backend (faked: jax's backend query answers 'gpu') a gs:// --compilation_cache_dir
  is refused at start-up with one line naming the flag and the fix, before jax is pointed at it
  (XLA would write its GPU autotuning cache to a local folder 'gs:'); on TPUs the same bucket is
  taken, and on GPUs a filesystem path."""
  from farmer_jax.commands import common
  before = jax.config.jax_compilation_cache_dir
  fv = cli.flag_values("train")
  fv(["farmer_jax train", "--compilation_cache_dir=gs://bkt/xla_cache"])
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(UserError) as e:
    common.start_jax(fv)
  code, line = exits.failure(e.value, "train")
  assert code == 2 and line.startswith("--compilation_cache_dir=gs://bkt/xla_cache: a bucket "
                                       "cannot hold the compilation cache on GPUs"), line
  assert "Fix: a directory on a filesystem every host mounts" in line and "\n" not in line
  assert jax.config.jax_compilation_cache_dir == before
  common.check_compilation_cache(str(tmp_path / "xla_cache"), lambda: "gpu")
  common.check_compilation_cache("gs://bkt/xla_cache", lambda: "cpu")
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  try:
    common.start_jax(fv)
    assert jax.config.jax_compilation_cache_dir == "gs://bkt/xla_cache"
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
