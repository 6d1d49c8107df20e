"""vitembed in a Ray Data pipeline of one's own: image files in, a column of tokens out.

    import ray, vitembed.ray

    ds = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    ds = vitembed.ray.encode(ds, preset="vit-b16", dtype="float16")   # adds "tokens" and "error"
    ds.write_parquet("s3://bucket/tokens/")

`encode` builds the layer once, here (a random layer from `seed`, or `weights` read once), and maps
`TokenEncoder` over the dataset on a pool of actors, each of which builds its `Encoder` once from
the layer's parameters: the tokens are the bits `vitembed encode` writes for the same options.
`TokenEncoder` can be given to `map_batches` directly, with `encoder_args`.

Columns of the result, one row per input row:

- **tokens**: z0 as Arrow's canonical fixed-shape tensor (`arrow.fixed_shape_tensor`, shape
  (N+1, D)), which Parquet keeps and plain pyarrow reads back:
  `pq.read_table(path)["tokens"].combine_chunks().to_numpy_ndarray()` is (rows, N+1, D).
  float32 or float16; **bfloat16 tokens are their bits, uint16** (numpy and Arrow have no
  bfloat16): `torch.from_numpy(a).view(torch.bfloat16)`, or in numpy
  `(a.astype(np.uint32) << 16).view(np.float32)`, which is exact.
- **error**: null, or why the file could not be read or decoded (its tokens are then NaN).
- the input's other columns as they were (`path`, ...); `bytes` (or a sample's image column) is
  dropped, unless `keep_bytes`.

Rows need a `bytes` column (`read_binary_files`), a `path` column (local paths every node sees,
or URIs that pyarrow reads: s3://, gs://, hdfs://, file://; each read whole, its size bounded by
`--max-pixels`, as `vitembed encode --ray` reads them), or WebDataset samples' image bytes:

    ds = ray.data.read_webdataset("s3://bucket/shards/", decoder=None)   # columns __key__, jpg, json, ...
    ds = vitembed.ray.encode(ds, preset="vit-b16")   # the first of jpg, jpeg, png, webp

This module is `vitembed.ray`; within it, `import ray` is Ray itself (imports are absolute).
"""

from __future__ import annotations

from typing import Any

import ray

from .executors.actors import EncoderActor
from .pipeline.request import actor_engine
from .files.uris import as_file

__all__ = ["SAMPLE_IMAGES", "TokenEncoder", "encode", "encoder_args", "image_columns", "sample_images"]


def encoder_args(*, num_gpus: float = 0, **options) -> dict[str, Any]:
    """`TokenEncoder`'s constructor arguments (for `fn_constructor_kwargs`): the layer's parameters
    and preprocessing, built here from the options of `vitembed encode` as keywords (`preset`,
    `weights`, `seed`, `image_size`, ..., `resize`, `normalize`, ..., `dtype`, `engine`, `tokens`,
    `pos_resample`).

    Args:
        num_gpus: GPUs each actor will hold (the layer then runs with torch on CUDA).

    Raises:
        ConfigError: options that cannot work together; TypeError: an option that is not one of these.
    """
    from .pipeline.request import EncodeRequest, encoder_option_names

    names = encoder_option_names()
    unknown = set(options) - names
    if unknown:
        raise TypeError(f"not an encoder option: {', '.join(sorted(unknown))}; "
                        f"these are: {', '.join(sorted(names))}")
    request = EncodeRequest.from_options(**options)
    encoder, _, _ = request.build_encoder("numpy", "cpu")  # here only for its parameters and preprocessing
    engine, device = actor_engine(request.executor.engine, num_gpus)
    return dict(params=encoder.params, prep=encoder.prep, dtype=encoder.dtype, engine=engine, device=device,
                tokens=encoder.tokens, pos_resample=encoder.pos_resample)


def encode(ds: ray.data.Dataset, *, batch_size: int = 32, actors: int | None = None, num_cpus: float = 1,
           num_gpus: float = 0, keep_bytes: bool = False, **options) -> ray.data.Dataset:
    """The dataset with each row's tokens (`TokenEncoder` on an actor pool; lazy, as Ray Data is).

    Args:
        ds: rows with `bytes` (`read_binary_files`) or `path`.
        batch_size: rows per call of an actor.
        actors: the most actors (None: as many as the cluster holds, scaled by Ray Data).
        num_cpus, num_gpus: per actor (fractions allowed).
        keep_bytes: keep the image bytes in the result.
        **options: `vitembed encode`'s layer, image and dtype options (see `encoder_args`).
    """
    return ds.map_batches(
        TokenEncoder, fn_constructor_kwargs={**encoder_args(num_gpus=num_gpus, **options), "keep_bytes": keep_bytes},
        batch_size=batch_size, batch_format="pyarrow", num_cpus=num_cpus, num_gpus=num_gpus or None,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))


SAMPLE_IMAGES = ("jpg", "jpeg", "png", "webp")  # WebDataset's image columns (`read_webdataset`), first found


def image_columns(table) -> list[str]:
    """The columns a batch's images come from: `bytes`, else `path`, else a WebDataset sample's
    images (`ray.data.read_webdataset(..., decoder=None)`: those of `SAMPLE_IMAGES` it has, in
    that order, a row's image the first it holds).

    Raises:
        ValueError: none of these.
    """
    names = table.column_names
    columns = next(([name] for name in ("bytes", "path") if name in names), None) or [
        name for name in SAMPLE_IMAGES if name in names]
    if not columns:
        raise ValueError(f"vitembed.ray needs rows with a 'bytes' column (read_binary_files), a 'path' column, or "
                         f"a WebDataset image column ({', '.join(SAMPLE_IMAGES)}); these have {', '.join(names)}")
    return columns


def sample_images(table, columns: list[str]) -> list:
    """Each row's image bytes: the first of `columns` it holds (b"" for none: that row's error). A
    sample without a column's member holds None there, or NaN in a column of Python objects.

    Raises:
        ValueError: images that Ray decoded already (`read_webdataset`'s default).
    """
    images = []
    for row in zip(*(table.column(c).to_pylist() for c in columns)):
        image = next((value for value in row if value is not None and not isinstance(value, float)), b"")  # NaN: none
        if not isinstance(image, (bytes, bytearray)):
            raise ValueError(f"the {'/'.join(columns)} column holds images Ray decoded ({type(image).__name__}); "
                             "vitembed decodes them itself, as vitembed encode does (EXIF orientation, alpha, "
                             "16-bit): read the shards with ray.data.read_webdataset(..., decoder=None)")
        images.append(image)
    return images


class TokenEncoder(EncoderActor):
    """A callable class for `Dataset.map_batches` (batch_format="pyarrow"): image files -> tokens.

    Built once per actor, called per batch (see the module docstring for the columns):

        ds.map_batches(vitembed.ray.TokenEncoder, fn_constructor_kwargs=vitembed.ray.encoder_args(preset="vit-b16"),
                       batch_format="pyarrow", batch_size=32, compute=ray.data.ActorPoolStrategy(size=4))

    Args:
        params, prep, dtype, engine, device: from `encoder_args`.
        keep_bytes: keep the `bytes` column, or a sample's image column (by default the tokens replace it).
    """

    def __init__(self, params: Any, prep: Any = None, *, keep_bytes: bool = False, **encoder):
        super().__init__(params, prep, **encoder)
        self.keep_bytes = keep_bytes

    def __call__(self, batch):
        import numpy as np
        import pyarrow as pa

        table = batch if isinstance(batch, pa.Table) else pa.table(batch)
        columns = image_columns(table)
        if columns == ["path"]:
            files = list(map(as_file, table.column("path").to_pylist()))
        elif columns == ["bytes"]:
            files = table.column("bytes").to_pylist()
        else:
            files = sample_images(table, columns)
        result = self.encoder.encode_files(files)
        if columns != ["path"] and not self.keep_bytes:
            table = table.drop_columns(columns)
        tokens = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(result.tokens))
        return table.append_column("tokens", tokens).append_column("error", pa.array(result.errors, pa.string()))
