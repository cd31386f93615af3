"""Measurement tools: benchmark steps, the open_clip peer, compiled-program reading, chips."""
