"""Evaluation: zero-shot classification, retrieval, linear probes, and their prompts."""
