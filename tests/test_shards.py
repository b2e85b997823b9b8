import hashlib
import io
import tarfile

import numpy as np

from datagen.sample import npy_bytes
from datagen.sampleformat import npy_array, read_tar
from datagen.shards import (
    committed_stats,
    read_stats,
    tar_bytes,
    write_shard,
)


def _samples(rng):
    return {
        f"k{i}-r00": {
            "json": b'{"a": %d}\n' % i,
            "tracks.npy": npy_bytes(rng.normal(size=(3, 4, 2)).astype(np.float32)),
            "mp4": rng.bytes(100 + i),
        }
        for i in (2, 0, 1)
    }


def test_tar_is_reproducible_sorted_and_fixed_metadata():
    rng = np.random.default_rng(0)
    s = _samples(rng)
    a = tar_bytes(s)
    b = tar_bytes(dict(reversed(list(s.items()))))
    assert a == b
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        infos = tar.getmembers()
    names = [i.name for i in infos]
    assert names == sorted(names)
    assert {(i.mtime, i.uid, i.gid, i.mode, i.uname, i.gname) for i in infos} == {
        (0, 0, 0, 0o644, "", "")
    }


def test_reader_reads_back_exactly_what_writer_wrote(tmp_path):
    rng = np.random.default_rng(1)
    s = _samples(rng)
    stats = write_shard(tmp_path, 0, {"core": s}, "0123456789abcdef", [])
    back = dict(read_tar(tmp_path / "core-000000.tar"))
    assert back == s
    arr = npy_array(back["k0-r00"]["tracks.npy"])
    assert arr.dtype == np.float32 and np.array_equal(arr, npy_array(s["k0-r00"]["tracks.npy"]))
    data = (tmp_path / "core-000000.tar").read_bytes()
    assert stats.files["core"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert stats.files["core"]["bytes"] == len(data)
    assert stats.keys == ["k0-r00", "k1-r00", "k2-r00"]
    assert not list(tmp_path.glob(".*partial"))


def test_commit_marker_guards_fingerprint_and_checksum(tmp_path):
    s = _samples(np.random.default_rng(2))
    feats = {k: {"qk.safetensors": b"x" * 10} for k in s}
    write_shard(tmp_path, 0, {"core": s, "features": feats}, "0123456789abcdef", [])
    kinds = ("core", "features")
    assert committed_stats(tmp_path, 0, "0123456789abcdef", kinds) is not None
    assert committed_stats(tmp_path, 0, "fedcba9876543210", kinds) is None
    assert committed_stats(tmp_path, 0, "0123456789abcdef", ("core",)) is None
    # A damaged features tar un-commits the whole shard.
    ftar = tmp_path / "features-000000.tar"
    ftar.write_bytes(ftar.read_bytes()[:-512])
    assert committed_stats(tmp_path, 0, "0123456789abcdef", kinds) is None
    write_shard(tmp_path, 1, {"core": s}, "0123456789abcdef", [])
    path = tmp_path / "core-000001.tar"
    raw = bytearray(path.read_bytes())
    raw[700] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert read_stats(tmp_path, 1) is not None
    assert committed_stats(tmp_path, 1, "0123456789abcdef", ("core",)) is None


def test_feature_keys_must_match_core_keys(tmp_path):
    import pytest

    s = _samples(np.random.default_rng(3))
    with pytest.raises(ValueError, match="keys differ"):
        write_shard(tmp_path, 0, {"core": s, "features": {"k0-r00": {}}}, "0123456789abcdef", [])


def test_npy_loading_refuses_object_arrays():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    import pytest

    with pytest.raises(ValueError):
        npy_array(buf.getvalue())
