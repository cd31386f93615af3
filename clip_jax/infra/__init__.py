"""Infrastructure with no ML in it: errors, the path layer, cache, logs, run locks, the CLI."""
