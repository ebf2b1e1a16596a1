"""The `data.shards` section: a dataset written as shard files (by
`orchestra data convert`) that workers read on the fly, each its own share,
instead of loading the whole set into memory.

Two formats, named here and in the folder's `manifest.json`:

- `npy`: each shard is a pair of `.npy` files (examples, labels), read by
  index (positional reads), so the job keeps the in-memory path's guarantee: global batch k holds the same examples on 1
  or N workers, and the same ones as with `data.source` on the same arrays.
- `tfrecord`: each shard is a TFRecord file of `tf.train.Example`s, read
  as a stream with `tf.data`. Worker r reads shard files r, r+N, …; each
  epoch it reads them once, in an order seeded by (seed, epoch), shuffled
  a window of `shuffle_buffer` records at a time (docs/data-sources.md).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from orchestra.spec._base import PATH_MAX, StrictModel, _usable_path

# Records a TFRecord shuffle window holds (each worker, in memory).
MAX_SHUFFLE_BUFFER = 1_000_000


class ShardsSpec(StrictModel):
    """Shard files and their manifest, as `orchestra data convert` writes them.

    Args:
        path: the folder holding `manifest.json` and the shards; a relative
            path is looked up in the dataset directory (`ORCHESTRA_DATASETS`
            or `--datasets`); `s3://bucket/prefix` reads them from a bucket
            (each node downloads the files its workers read, once).
        format: `npy` (read by index) or `tfrecord` (streamed); must
            match the manifest's.
        shuffle_buffer: tfrecord: records shuffled together, a window of
            this many consecutive records at a time.

    Example:

        >>> ShardsSpec(path="mnist-npy", format="npy").shuffle_buffer
        10000
    """

    path: str = Field(
        min_length=1, max_length=PATH_MAX,
        description="Folder with manifest.json and the shard files (relative: in the dataset directory), "
                    "or s3://<bucket>/<prefix>: read from the bucket through a node-local cache.",
    )
    format: Literal["npy", "tfrecord"] = Field(
        description="npy: .npy shards read by index; tfrecord: TFRecord shards streamed.",
    )
    shuffle_buffer: int = Field(
        default=10_000, ge=1, le=MAX_SHUFFLE_BUFFER,
        description="tfrecord: records are shuffled a window of this many consecutive records at a time "
                    "(held in memory); npy shuffles the whole set by index instead.",
    )

    _paths = field_validator("path")(_usable_path)

    def problems_with(self, data) -> str | None:
        """Why the rest of the `data` section cannot go with these shards, or None."""
        if self.format == "tfrecord":
            taken = [name for name in ("validation_split", "validation_size", "train_size", "test_size")
                     if getattr(data, name) is not None]
            if taken:
                verb, them = ("needs", "it") if len(taken) == 1 else ("need", "them")
                return (f"{', '.join(taken)} {verb} reading by index, which TFRecord shards (a stream) cannot "
                        f"give: use format 'npy', or leave {them} out (for a validation set, convert with "
                        "--validation-split F and set validation 'split')")
        return None
