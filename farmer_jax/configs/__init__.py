"""The shipped run configs, one file each: ``--config=NAME[:arg]`` (e.g. ``--config=quickstart``,
``--config=imagenet256:1.1B/16``) loads ``NAME.py`` from here (configlib.resolve)."""
