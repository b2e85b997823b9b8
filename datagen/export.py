"""`datagen export D --to DIR`: a dataset as plain files, one folder per key.

::

    DIR/
      keys.txt                         the keys, one a line, in dataset order
      manifest.json                    the source manifest (when there is one)
      KEY/video.mp4                    the stored video, byte for byte
      KEY/meta.json                    the sample's metadata, byte for byte
      KEY/tracks.npy visible.npy queries.npy confidence.npy    the stored .npy, byte for byte
      KEY/NAME.npy                     any other .npy member of the build (e.g. masks.npy)
      KEY/correspondence/NAME.npy      each correspondence array (builds that capture it)
      KEY/features/q.layer000.step002.npy ...   each q/k tensor, fp16 (with features=True)

The folder is written under a temporary name and renamed when complete, so ``DIR`` is either
absent or a finished export.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datagen.data import open_dataset
from datagen.errors import UserError
from datagen.names import member_problem, open_new, safe_join
from datagen.sampleformat import CORR_MEMBER, FEATURE_MEMBER, ShardError, safetensors_arrays
from datagen.shards import MANIFEST

KEYS_FILE = "keys.txt"
_RENAME = {"mp4": "video.mp4", "json": "meta.json"}


@dataclass
class ExportSummary:
    path: Path
    samples: int
    files: int
    bytes: int


def _write(path: Path, data: bytes | memoryview) -> int:
    with os.fdopen(open_new(path), "wb") as f:
        f.write(data)
    return len(data)


def _save_arrays(folder: Path, arrays: dict[str, np.ndarray]) -> tuple[int, int]:
    folder.mkdir()
    files = size = 0
    for name, array in arrays.items():
        problem = member_problem(name)
        if problem:
            raise ValueError(f"tensor {problem}")
        path = safe_join(folder, f"{name}.npy")
        with os.fdopen(open_new(path), "wb") as f:
            np.save(f, array, allow_pickle=False)
        files += 1
        size += path.stat().st_size
    return files, size


def export_dataset(
    src: Path | str,
    dst: Path | str,
    *,
    features: bool = False,
    keys: Iterable[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, str], None] | None = None,
) -> ExportSummary:
    """Write the samples of ``src`` (anything :func:`datagen.data.open_dataset` opens) as
    plain files under ``dst`` (see the module docstring); ``keys`` picks samples, ``features``
    adds the q/k tensors. ``dst`` must not exist (or be an empty folder, or with ``overwrite``
    an earlier export). Every member is checked against its index checksum on the way.

    Raises UserError (one line) for bad input: no dataset at ``src``, ``dst`` taken, a key
    that is not there, a damaged shard.
    """
    dst = Path(dst)
    if dst.exists():
        if not dst.is_dir():
            raise UserError(f"{dst} exists and is not a folder; choose a new folder for --to")
        if any(dst.iterdir()):
            if not overwrite:
                raise UserError(f"{dst} is not empty; choose a new folder for --to")
            if not (dst / KEYS_FILE).is_file():
                raise UserError(f"{dst} is not empty and not an earlier export; not replacing it")
    if not dst.parent.is_dir():
        raise UserError(f"{dst.parent} does not exist; create it first (--to)")
    ds = open_dataset(src, video=False, features=features)
    tmp = dst.parent / f".{dst.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write under {dst.parent} ({exc.strerror}); check --to") from None
    done: list[str] = []
    files = size = 0
    try:
        if ds.manifest is not None:
            size += _write(tmp / MANIFEST, json.dumps(ds.manifest, indent=1).encode() + b"\n")
            files += 1
        for key, raw, fraw in ds.iter_raw(keys):
            # Keys and member names were checked by the reader (datagen.names); the joins
            # check again, so nothing lands outside the export.
            folder = safe_join(tmp, key)
            folder.mkdir()
            for ext, data in sorted(raw.items()):
                if ext == CORR_MEMBER:
                    f, s = _save_arrays(folder / "correspondence", safetensors_arrays(data))
                else:
                    f, s = 1, _write(safe_join(folder, _RENAME.get(ext, ext)), data)
                files, size = files + f, size + s
            if fraw is not None:
                f, s = _save_arrays(folder / "features", safetensors_arrays(fraw[FEATURE_MEMBER]))
                files, size = files + f, size + s
            done.append(key)
            if progress:
                progress(len(done), key)
        size += _write(tmp / KEYS_FILE, "".join(k + "\n" for k in done).encode())
        files += 1
    except ShardError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{exc}; run datagen validate on the dataset") from None
    except KeyError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(str(exc.args[0])) from None
    except (OSError, ValueError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"export to {dst} failed ({exc})") from None
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return ExportSummary(dst, len(done), files, size)
