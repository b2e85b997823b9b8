"""Consumer loaders: read a datagen dataset from a folder, a manifest, a glob or URLs.

Quick start::

    ds = open_dataset("shards/")                     # frames + labels + correspondence + meta
    for s in ds: s["frames"], s["tracks"]            # manifest order
    ds["brown-horse-r00"]                            # one sample through the tar index
    ds = open_dataset("http://host/d/", video=VideoSpec(stride=2, size=(128, 192)),
                      features=FeatureSpec(layers=[17], steps=[49]))
    loader = DataLoader(ds.torch(batch_size=8, shuffle=True, seed=0), batch_size=None,
                        num_workers=4)

One concern a module:

- :mod:`~datagen.data.locate`: where the shards are (folder, manifest, glob, URLs) and the
  byte streams that read them; :func:`shard_urls`, :func:`hf_data_files`.
- :mod:`~datagen.data.options`: :class:`VideoSpec`, :class:`FeatureSpec`, the fields.
- :mod:`~datagen.data.shardread`: reading members of local (``mmap``), remote and indexed
  shards, with per-member checksums.
- :mod:`~datagen.data.decode`: a sample's members to its fields, with the decoders of the
  sample format (:mod:`datagen.sampleformat`, which also the writer and ``validate`` use).
- :mod:`~datagen.data.reader`: :func:`open_dataset` and :class:`Dataset`.
- :mod:`~datagen.data.split`: the split rule over epochs, ranks and workers.
- :mod:`~datagen.data.torch_dataset`: ``TorchDataset`` and :func:`collate_samples`.

Importing this package does not import torch; ``TorchDataset`` is built when first asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# ``from M import X as X``: public names kept outside ``__all__`` (as before the split).
from datagen.data.decode import decode_frames as decode_frames
from datagen.data.locate import SPLITS as SPLITS
from datagen.data.locate import Shard, hf_data_files, shard_urls
from datagen.data.options import DEFAULT_FIELDS as DEFAULT_FIELDS
from datagen.data.options import ON_ERROR as ON_ERROR
from datagen.data.options import VERIFY as VERIFY
from datagen.data.options import FeatureSpec, VideoSpec
from datagen.data.reader import Dataset, open_dataset
from datagen.data.reader import ErrorLog as ErrorLog
from datagen.data.split import SPLIT_RULES as SPLIT_RULES
from datagen.data.split import buffer_order as buffer_order
from datagen.data.split import epoch_order, rank_range, worker_range
from datagen.data.torch_dataset import collate_samples, torch_dataset_class
from datagen.sampleformat import FIELDS as FIELDS
from datagen.sampleformat import CorruptShardError, ShardError, TruncatedShardError
from datagen.sampleformat import npy_array as npy_array
from datagen.sampleformat import safetensors_arrays as safetensors_arrays

__all__ = [
    "CorruptShardError",
    "Dataset",
    "FeatureSpec",
    "Shard",
    "ShardError",
    "TorchDataset",
    "TruncatedShardError",
    "VideoSpec",
    "collate_samples",
    "epoch_order",
    "hf_data_files",
    "open_dataset",
    "rank_range",
    "shard_urls",
    "worker_range",
]


def __getattr__(name: str) -> Any:
    if name == "TorchDataset":
        return torch_dataset_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from datagen.data.torch_dataset import _TorchDatasetImpl as TorchDataset  # noqa: F401
