"""The content-addressed Zarr activation store: keys, layout, shard commits, lazy reading."""
