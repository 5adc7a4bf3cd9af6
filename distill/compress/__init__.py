"""Compression techniques, each one object in :mod:`.registry` (see :mod:`.technique` for the interface)."""
