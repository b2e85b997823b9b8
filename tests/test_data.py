"""Consumer loaders: fields, random access, the split rule, HTTP, damaged shards, HF, export."""

import collections
import functools
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import safetensors.numpy

from datagen.build import prepare_build, run_build
from datagen.data import (
    CorruptShardError,
    FeatureSpec,
    TruncatedShardError,
    VideoSpec,
    buffer_order,
    collate_samples,
    epoch_order,
    hf_data_files,
    npy_array,
    open_dataset,
    rank_range,
)
from datagen.errors import UserError
from datagen.index import TarIndex, index_name
from datagen.presets import resolve_config
from datagen.video import decode_video

PROMPTS = "\n".join(
    [
        "a brown dog runs along the beach from left to right",
        "the camera pans slowly right across a brick city street",
        "a red car turns the corner",
        "a white cat jumps onto a wooden table",
        "a small boat glides across a lake",
        "a kite drifts over a green hill",
    ]
)
SETTINGS = [
    "shards.max_samples=4",
    "generation.batch_size=2",
    # Two denoising steps (capture at both) keep the build a few seconds on 2 cores.
    "generation.num_inference_steps=2",
    "capture.feature_steps=[0,1]",
    "capture.corr_steps=[0,1]",
]
ARRAYS = ("tracks", "visible", "queries", "confidence")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Six samples in two uneven shards (4 + 2), with correspondence and features."""
    root = tmp_path_factory.mktemp("data")
    prompts = root / "bank.txt"
    prompts.write_text(PROMPTS + "\n")
    cfg = resolve_config("tiny-random", None, SETTINGS)
    run_build(prepare_build(cfg, prompts, root / "d"), progress=False)
    return root / "d"


def _tar_members(path):
    """{key: {ext: bytes}} read with the standard library, for comparison."""
    out = collections.defaultdict(dict)
    with tarfile.open(path) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            out[key][ext] = tar.extractfile(info).read()
    return out


def _all_members(folder, kind):
    """Members of every shard of ``kind``, in dataset (shard, then tar) order."""
    out = {}
    for tar in sorted(folder.glob(f"{kind}-*.tar")):
        out.update(_tar_members(tar))
    return out


def _same(a, b):
    """Sample dicts equal field by field, arrays bit for bit (dtype included)."""
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes(), name
        elif isinstance(x, dict) and name in ("correspondence", "features"):
            _same(x, y)
        else:
            assert x == y, name


def test_every_field_round_trips_exactly(built):
    core, feats = _all_members(built, "core"), _all_members(built, "features")
    manifest = json.loads((built / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"] if s["kind"] == "core"] == [4, 2]
    ds = open_dataset(built, fields=list(ARRAYS) + ["correspondence", "meta", "mp4"], features=True)
    samples = list(ds)
    assert [s["key"] for s in samples] == list(core) and len(ds) == 6
    for s in samples:
        raw = core[s["key"]]
        for name in ARRAYS:
            stored = np.load(io.BytesIO(raw[f"{name}.npy"]), allow_pickle=False)
            assert s[name].dtype == stored.dtype and s[name].shape == stored.shape
            assert s[name].tobytes() == stored.tobytes()
        assert s["mp4"] == raw["mp4"]
        assert s["meta"] == json.loads(raw["json"])
        np.testing.assert_array_equal(s["frames"], decode_video(raw["mp4"]))
        for group, blob in (
            ("correspondence", raw["corr.safetensors"]),
            ("features", feats[s["key"]]["qk.safetensors"]),
        ):
            stored = safetensors.numpy.load(blob)
            assert s[group].keys() == stored.keys()
            for k, v in stored.items():
                assert s[group][k].dtype == v.dtype and s[group][k].tobytes() == v.tobytes()
        assert s["features"]["q.layer000.step001"].dtype == np.float16


def test_field_choice_video_options_and_feature_selection(built):
    ds = open_dataset(
        built,
        video=VideoSpec(stride=2, size=(32, 48), dtype="float32", channels_first=True),
        fields=["tracks"],
        features=FeatureSpec(layers=[1], steps=[1], kinds=["q"]),
    )
    s = ds[0]
    assert set(s) == {"key", "frames", "tracks", "features"}
    assert s["frames"].shape == (5, 3, 32, 48) and s["frames"].dtype == np.float32
    assert 0 <= s["frames"].min() and s["frames"].max() <= 1
    assert list(s["features"]) == ["q.layer001.step001"]
    labels = open_dataset(built, video=False, fields=["visible"])[0]
    assert set(labels) == {"key", "visible"}
    with pytest.raises(UserError, match="unknown field"):
        open_dataset(built, fields=["tracks", "no such"])


def test_index_offsets_match_the_tar_and_random_access_equals_streaming(built, tmp_path):
    for tar in sorted(built.glob("*.tar")):
        idx = TarIndex.from_bytes((built / index_name(tar.name)).read_bytes())
        with tarfile.open(tar) as t:
            for info in t:
                key, _, ext = info.name.partition(".")
                m = idx.samples[idx.position(key)].members[ext]
                assert (m.offset, m.size) == (info.offset_data, info.size)
    ds = open_dataset(built, features=True)
    streamed = list(ds)
    for i, s in enumerate(streamed):
        _same(ds[s["key"]], s)
        _same(ds[i], s)
    assert streamed[0]["key"] in ds and "nope-r00" not in ds
    with pytest.raises(KeyError, match="nope-r00"):
        ds["nope-r00"]
    # Without index files (an older build): headers are scanned, same samples.
    bare = tmp_path / "bare"
    shutil.copytree(built, bare)
    for f in bare.glob("*.idx.json"):
        f.unlink()
    again = open_dataset(bare, features=True)
    for s in streamed:
        _same(again[s["key"]], s)


def _keys(td, workers):
    """Keys of one rank, in DataLoader order, with ``workers`` simulated one after another
    the way a DataLoader interleaves them (round-robin, one item each)."""
    streams = []
    for w in range(workers):
        td.worker = (w, workers)
        streams.append([item["key"] for item in td])
    out = []
    for r in range(max(map(len, streams), default=0)):
        out += [s[r] for s in streams if r < len(s)]
    return out


def test_two_workers_two_ranks_see_every_key_once(built):
    from torch.utils.data import DataLoader

    ds = open_dataset(built, video=False, fields=["tracks"])
    seen = collections.Counter()
    per_rank = []
    for rank in range(2):
        td = ds.torch(batch_size=2, shuffle=True, seed=3, rank=rank, world_size=2)
        keys = [k for b in DataLoader(td, batch_size=None, num_workers=2) for k in b["key"]]
        per_rank.append(len(keys))
        seen.update(keys)
    assert per_rank == [3, 3]
    assert sorted(seen) == sorted(ds.keys()) and set(seen.values()) == {1}


@pytest.mark.parametrize("rule,per_rank,distinct", [("repeat", 2, 6), ("drop", 1, 4)])
def test_uneven_split_gives_equal_counts_by_the_rule(built, rule, per_rank, distinct):
    """6 samples over 4 ranks x 2 workers (more workers than shards)."""
    ds = open_dataset(built, video=False, fields=["visible"])
    counts = []
    seen = collections.Counter()
    for rank in range(4):
        td = ds.torch(shuffle=True, seed=0, rank=rank, world_size=4, rule=rule)
        keys = _keys(td, 2)
        counts.append(len(keys))
        seen.update(keys)
        assert len(td) == per_rank
    assert counts == [per_rank] * 4
    assert len(seen) == distinct and sum(seen.values()) == 4 * per_rank


def test_same_seed_same_order_and_epochs_reshuffle(built):
    ds = open_dataset(built, video=False, fields=["meta"])

    def order(seed, epoch):
        td = ds.torch(shuffle=True, seed=seed, buffer=4, epoch=epoch)
        return _keys(td, 2)

    assert order(7, 0) == order(7, 0)
    assert sorted(order(7, 0)) == sorted(ds.keys())
    assert len({tuple(order(s, e)) for s in range(3) for e in range(3)}) > 1
    assert [s["key"] for s in ds.iter(shuffle=True, seed=5)] == [
        s["key"] for s in ds.iter(shuffle=True, seed=5)
    ]
    # The rule's parts, directly: shards permuted, positions in order, cyclic repeat.
    shards, positions = epoch_order([4, 2], epoch=0, seed=1, shuffle=True)
    pairs = sorted(zip(shards.tolist(), positions.tolist(), strict=True))
    assert pairs == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert rank_range(5, 1, 2).tolist() == [3, 4, 0] and rank_range(5, 1, 2, "drop").tolist() == [
        2,
        3,
    ]
    assert sorted(buffer_order(50, 8, 0)) == list(range(50))


def test_resume_from_a_position_continues_exactly(built):
    from torch.utils.data import DataLoader

    ds = open_dataset(built, video=False, fields=["tracks"])

    def loader(state=None):
        td = ds.torch(batch_size=2, shuffle=True, seed=11, buffer=3, rank=0, world_size=1)
        if state:
            td.load_state_dict(state)
        return DataLoader(td, batch_size=None, num_workers=2)

    batches = list(loader())
    # Parts of 3 and 3 samples, batches of 2: w0 2, w1 2, w0 1, w1 1.
    assert [b["position"]["offset"] for b in batches] == [2, 4, 5, 6]
    full = [k for b in batches for k in b["key"]]
    assert sorted(full) == sorted(ds.keys())
    for b in batches[:-1]:
        rest = [k for r in loader(b["position"]) for k in r["key"]]
        assert rest == full[b["position"]["offset"] :]


def test_resampled_epochs_run_on(built):
    ds = open_dataset(built, video=False, fields=["visible"])
    td = ds.torch(shuffle=True, seed=2, resampled=True)
    stream = iter(td)
    items = [next(stream) for _ in range(12)]
    assert [i["position"]["epoch"] for i in items] == [0] * 6 + [1] * 6
    first, second = [i["key"] for i in items[:6]], [i["key"] for i in items[6:]]
    assert sorted(first) == sorted(second) == sorted(ds.keys())


def test_collate_pads_varying_points_with_a_mask():
    rng = np.random.default_rng(0)

    def sample(n):
        return {
            "key": f"k{n}",
            "tracks": rng.random((n, 4, 2), dtype=np.float32),
            "visible": np.ones((n, 4), bool),
            "queries": rng.random((n, 3), dtype=np.float32),
            "confidence": np.full((n, 4), 0.5, np.float32),
            "meta": {"n": n},
        }

    batch = collate_samples([sample(3), sample(5)])
    assert batch["tracks"].shape == (2, 5, 4, 2) and batch["queries"].shape == (2, 5, 3)
    assert batch["point_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert not batch["visible"][0, 3:].any() and np.isnan(batch["confidence"][0, 3:]).all()
    assert (batch["tracks"][0, 3:] == 0).all() and batch["key"] == ["k3", "k5"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(built, monkeypatch):
    """The dataset folder over HTTP on the loopback address, ephemeral port."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(built)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_streaming_over_http_equals_local(built, served):
    local = list(open_dataset(built, features=True))
    remote = open_dataset(served + "/", features=True)
    for a, b in zip(local, remote, strict=True):
        _same(a, b)
    _same(remote[local[4]["key"]], local[4])
    # Shard URLs without the manifest, and the torch split over HTTP.
    urls = [f"{served}/core-00000{i}.tar" for i in range(2)]
    listed = open_dataset(urls, video=False)
    assert [s["key"] for s in listed] == [s["key"] for s in local] and len(listed) == 6
    td = open_dataset(served, video=False, fields=["tracks"]).torch(rank=1, world_size=2)
    assert len(_keys(td, 2)) == 3


def _damaged_copy(built, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(built, out)
    return out, TarIndex.from_bytes((out / "core-000000.tar.idx.json").read_bytes())


def test_truncated_shard_names_shard_and_key(built, tmp_path):
    out, idx = _damaged_copy(built, tmp_path)
    victim = idx.samples[2]
    tar = out / "core-000000.tar"
    tar.write_bytes(tar.read_bytes()[: victim.members["tracks.npy"].offset + 10])
    ds = open_dataset(out, video=False)
    seen = []
    with pytest.raises(TruncatedShardError, match=f"core-000000.tar: {victim.key}"):
        for s in ds:
            seen.append(s["key"])
    assert seen == [s.key for s in idx.samples[:2]]
    # Without the index the header scan names the same key.
    (out / "core-000000.tar.idx.json").unlink()
    with pytest.raises(TruncatedShardError, match=f"core-000000.tar: {victim.key}"):
        list(open_dataset(out, video=False))
    # Skip: logged, counted, the rest is read; the torch split keeps its counts.
    skipping = open_dataset(out, video=False, on_error="skip")
    keys = [s["key"] for s in skipping]
    assert len(keys) == 4 and skipping.errors.count == 2
    td = open_dataset(out, video=False, on_error="skip").torch(rank=0, world_size=2)
    assert len(_keys(td, 2)) == 3


def test_flipped_byte_names_shard_key_and_member(built, tmp_path):
    out, idx = _damaged_copy(built, tmp_path)
    victim = idx.samples[1]
    m = victim.members["queries.npy"]
    tar = out / "core-000000.tar"
    raw = bytearray(tar.read_bytes())
    raw[m.offset + m.size - 3] ^= 0x10
    tar.write_bytes(bytes(raw))
    ds = open_dataset(out, video=False)
    with pytest.raises(CorruptShardError, match=f"core-000000.tar: {victim.key}.queries.npy"):
        list(ds)
    with pytest.raises(CorruptShardError, match="checksum"):
        ds[victim.key]
    # Not asked to verify: the bytes are read as they are.
    assert open_dataset(out, video=False, verify="none")[victim.key]["key"] == victim.key
    # verify="all": the shard's sha256 against the manifest, before any sample of it.
    with pytest.raises(CorruptShardError, match="core-000000.tar: sha256 differs"):
        open_dataset(out, video=False, verify="all", fields=["meta"])[idx.samples[0].key]
    # The features shard of the same number is checked the same way.
    fidx = TarIndex.from_bytes((out / "features-000001.tar.idx.json").read_bytes())
    fm = fidx.samples[0].members["qk.safetensors"]
    ftar = out / "features-000001.tar"
    fraw = bytearray(ftar.read_bytes())
    fraw[fm.offset + fm.size // 2] ^= 0x01
    ftar.write_bytes(bytes(fraw))
    with pytest.raises(CorruptShardError, match=f"features-000001.tar: {fidx.samples[0].key}"):
        open_dataset(out, video=False, features=True)[fidx.samples[0].key]


def test_loading_never_unpickles():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays are refused"):
        npy_array(buf.getvalue())


def test_hugging_face_load_dataset(built, tmp_path):
    datasets = pytest.importorskip("datasets")
    hf = datasets.load_dataset(
        "webdataset",
        data_files={"train": hf_data_files(built)},
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert hf.num_rows == 6
    ours = {s["key"]: s for s in open_dataset(built, video=False)}
    for row in hf.cast_column("mp4", datasets.Video(decode=False)):
        s = ours[row["__key__"]]
        np.testing.assert_array_equal(np.asarray(row["tracks.npy"], np.float32), s["tracks"])
        assert row["json"]["key"] == s["key"]


def test_open_from_glob_manifest_list_and_fsspec(built):
    keys = open_dataset(built, video=False).keys()
    for source in (
        built / "manifest.json",
        str(built / "core-*.tar"),
        str(built / "core-{000000..000001}.tar"),
        [built / "core-000000.tar", built / "core-000001.tar"],
    ):
        assert [s["key"] for s in open_dataset(source, video=False)] == keys
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for f in built.iterdir():
        fs.pipe(f"/ds/{f.name}", f.read_bytes())
    mem = open_dataset("memory://ds", video=False, features=True)
    assert [s["key"] for s in mem] == keys and mem[keys[3]]["key"] == keys[3]
    with pytest.raises(UserError, match="no manifest.json"):
        open_dataset(built.parent)
    with pytest.raises(UserError, match="matches no shard"):
        open_dataset(str(built / "nothing-*.tar"))


def test_export_writes_plain_files_exactly(built, tmp_path):
    from datagen.export import export_dataset

    dst = tmp_path / "plain"
    summary = export_dataset(built, dst, features=True)
    core, feats = _all_members(built, "core"), _all_members(built, "features")
    assert summary.samples == 6
    assert (dst / "keys.txt").read_text().split() == list(core)
    for key, raw in core.items():
        assert (dst / key / "video.mp4").read_bytes() == raw["mp4"]
        assert (dst / key / "meta.json").read_bytes() == raw["json"]
        for name in ARRAYS:
            assert (dst / key / f"{name}.npy").read_bytes() == raw[f"{name}.npy"]
        for group, blob in (
            ("correspondence", raw["corr.safetensors"]),
            ("features", feats[key]["qk.safetensors"]),
        ):
            for k, v in safetensors.numpy.load(blob).items():
                back = np.load(dst / key / group / f"{k}.npy", allow_pickle=False)
                assert back.dtype == v.dtype and back.tobytes() == v.tobytes()
    with pytest.raises(UserError, match="not empty"):
        export_dataset(built, dst)
    assert export_dataset(built, dst, overwrite=True, keys=[sorted(core)[1]]).samples == 1
    with pytest.raises(UserError, match="no manifest.json"):
        export_dataset(tmp_path, tmp_path / "x")
    with pytest.raises(UserError, match="no sample with key"):
        export_dataset(built, tmp_path / "y", keys=["missing-r00"])
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".*partial"))


def test_the_loader_keeps_its_public_names_and_imports_torch_only_when_asked():
    import datagen.data

    public = {
        "CorruptShardError", "Dataset", "FeatureSpec", "Shard", "ShardError", "TorchDataset",
        "TruncatedShardError", "VideoSpec", "collate_samples", "epoch_order", "hf_data_files",
        "open_dataset", "rank_range", "shard_urls", "worker_range",
    }  # fmt: skip
    assert set(datagen.data.__all__) == public
    more = ("DEFAULT_FIELDS", "ErrorLog", "FIELDS", "ON_ERROR", "SPLITS", "SPLIT_RULES")
    more += ("VERIFY", "buffer_order", "decode_frames", "npy_array", "safetensors_arrays")
    assert all(hasattr(datagen.data, name) for name in sorted(public) + list(more))
    code = (
        "import sys, datagen.data\n"
        "print('torch' in sys.modules)\n"
        "cls = datagen.data.TorchDataset\n"
        "print('torch' in sys.modules, cls.__module__, cls.__qualname__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "datagen.data", "TorchDataset"]
