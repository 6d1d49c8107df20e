"""Files on disk and in stores: atomic link-safe writes, bounded regular-file reads, the `.npy`/`.pt`
formats, pyarrow filesystems (URIs), Parquet and WebDataset token shards, `show`'s PNG files, and
the statistics of a saved output.

This package imports nothing: importing one of its modules never pulls in its siblings.
"""
