"""Run by tests/test_rehearsal.py (never imported by pytest): ``python rehearsal_cli.py <command>
--flags...`` is ``farmer_jax <command> --flags...`` (the console script, ``farmer_jax.cli.run``,
unchanged), with every ``gs://`` path redirected into the local stand-in bucket FAKE_GCS_ROOT
(tests/fake_gcs.py)."""

import os
import sys


def main():
  from farmer_jax import host_memory
  # the command configures malloc before jax starts its threads; the fake bucket imports orbax
  # (and so jax) first, so do it here too (configure is idempotent)
  host_memory.configure()
  from fake_gcs import fake_gcs   # next to this script: on sys.path

  from farmer_jax import cli
  with fake_gcs(os.environ["FAKE_GCS_ROOT"]):
    cli.run(["farmer_jax"] + sys.argv[1:])


if __name__ == "__main__":
  main()
