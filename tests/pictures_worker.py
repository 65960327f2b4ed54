"""Run by tests/test_train_pictures.py (never imported by pytest): one process of a 2-process CPU
run of the tiny quickstart (4 fake devices each, data=4 x fsdp=2) into a gs:// workdir (tests/
fake_gcs.py, FAKE_GCS_ROOT) with a periodic eval and its sample grid, then the report."""

import os
import sys


def main():
  workdir, addr, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
  from farmer_jax.distributed import initialize
  initialize("explicit", addr, 2, index)
  import jax
  from farmer_jax import configlib
  from farmer_jax.config.parse import parse
  from farmer_jax.train.trainer import train_and_report
  assert jax.device_count() == 8 and jax.process_count() == 2
  c = configlib.load("quickstart:tiny")
  c.train.update(steps=10, batch_size=16, log_every=5, warmup_steps=2)
  c.eval.update(every=5, batch_size=250)
  c.sample.update(periodic_classes=3)
  c.mesh = (("data", 4), ("fsdp", 2))
  train_and_report(parse(c, workdir), workdir, quiet=True)


if __name__ == "__main__":
  from fake_gcs import fake_gcs
  with fake_gcs(os.environ["FAKE_GCS_ROOT"]):
    main()
