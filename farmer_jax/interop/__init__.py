"""Interop with other frameworks' checkpoints (PyTorch state_dicts read without torch)."""
