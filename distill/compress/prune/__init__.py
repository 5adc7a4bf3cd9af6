"""Pruning: the callback and its schedule, masks, physical channel removal, the sparse file."""
