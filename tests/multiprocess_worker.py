"""Run by tests/test_multiprocess.py (never imported by pytest): one process of a 2-process CPU
training run, or a single 8-device process that resumes / trains uninterrupted. Prints 'LOSSES
{json}' from process 0. With FAKE_GCS_ROOT set, gs:// workdirs live there (tests/fake_gcs.py)."""

import json
import os
import sys


def main():
  mode, workdir, steps, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  if mode == "proc":
    from farmer_jax.distributed import initialize
    initialize("explicit", sys.argv[5], 2, int(sys.argv[6]))
  import jax
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import start
  assert jax.device_count() == 8, jax.device_count()
  c = configlib.load("quickstart:tiny")
  # A gentle lr keeps the dynamics non-chaotic: at lr 3e-3 fp32 round-off from the different (gloo
  # vs in-process) reduction order grows from 1e-7 (step 5) to 1e-2 (step 15); at 1e-4 it stays at
  # round-off level.
  c.train.update(steps=steps, batch_size=16, log_every=5, lr=1e-4, warmup_steps=5, ckpt_every=0)
  # The 2-process run trains on data=4 x fsdp=2; the resuming single process restores onto
  # data=2 x fsdp=4 (another mesh and process count), the uninterrupted reference uses
  # data=4 x fsdp=2.
  c.mesh = (("data", 2), ("fsdp", 4)) if os.environ.get("RESUME_MESH") else (("data", 4), ("fsdp",
                                                                                           2))
  tr = start(parse(c, workdir), workdir, quiet=True)
  hist = tr.fit(stop_at=stop_at)
  if jax.process_index() == 0:
    print("LOSSES " + json.dumps({h["step"]: h["loss"] for h in hist}), flush=True)


if __name__ == "__main__":
  if os.environ.get("FAKE_GCS_ROOT"):
    from fake_gcs import fake_gcs
    with fake_gcs(os.environ["FAKE_GCS_ROOT"]):
      main()
  else:
    main()
