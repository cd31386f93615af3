"""Weights of other frameworks: reading files, state dicts <-> params, the pretrained registry."""
