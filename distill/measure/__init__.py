"""Measurements of a model: latency, accuracy, size, and the typed records that carry them."""
