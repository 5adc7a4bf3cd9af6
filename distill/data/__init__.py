"""Data modules (the `data=` group), their samplers and datasets."""
