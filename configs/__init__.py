"""Experiment configs: one `get_config(arg=None)` per file; `common.py` holds the shared base."""
