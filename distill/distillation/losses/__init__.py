"""Distillation losses, one module per method family; found by name in :mod:`.registry`."""
