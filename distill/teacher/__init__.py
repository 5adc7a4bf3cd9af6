"""The teacher: provisioned (loaded, cached or trained), its outputs cached, views replayed, students initialised from it."""
