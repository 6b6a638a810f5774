"""Loaders that read the shards written by `pipelines/` (webdataset tars + manifest JSON)."""
