"""Plumbing of a run: atomic writes, checkpoints, preemption, RNG state, rank sync, strategies, loggers."""
