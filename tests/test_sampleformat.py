"""The sample file format: each decoder against the writer's encoding, byte for byte, and the
malformed inputs each decoder must refuse (at least what numpy's and the safetensors
library's own loaders refuse, since validate relies on these decoders alone)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import safetensors.numpy

from datagen import sampleformat as sf
from datagen.config import VideoConfig
from datagen.sample import Sample
from datagen.shards import tar_bytes
from datagen.video import encode_video

# --- members and dtypes ----------------------------------------------------------------------


def test_member_lists_and_field_members():
    assert sf.members_for(False, False) == {"core": sorted(sf.CORE_MEMBERS)}
    assert sf.members_for(True, True, qc=True) == {
        "core": sorted(sf.CORE_MEMBERS + (sf.CORR_MEMBER, sf.QC_MEMBER)),
        "features": [sf.FEATURE_MEMBER],
    }
    assert {sf.field_member(f) for f in sf.FIELDS if f != "features"} == {
        "mp4",
        "json",
        "tracks.npy",
        "visible.npy",
        "queries.npy",
        "confidence.npy",
        sf.CORR_MEMBER,
    }
    assert sf.field_member("masks") == "masks.npy"
    assert sf.OPTIONAL_FIELDS <= set(sf.FIELDS)


def test_a_sample_encodes_its_labels_in_the_declared_dtypes():
    n, t = 3, 4
    rng = np.random.default_rng(0)
    sample = Sample(
        key="k-r00",
        video=b"\0",
        frames=np.zeros((t, 2, 2, 3), np.uint8),
        tracks=rng.random((n, t, 2), dtype=np.float32),
        visible=rng.random((n, t)) > 0.5,
        queries=rng.random((n, 3), dtype=np.float32),
        confidence=rng.random((n, t), dtype=np.float32),
        meta={"key": "k-r00", "text": "caf\u00e9"},
        extra_members={sf.QC_MEMBER: sf.npy_bytes(np.arange(n, dtype=np.uint8))},
    )
    members = sample.members()
    assert sorted(members) == sorted(sf.CORE_MEMBERS + (sf.QC_MEMBER,))
    for member, dtype in sf.MEMBER_DTYPES.items():
        assert sf.npy_array(members[member]).dtype == dtype, member
    assert sf.json_value(members["json"]) == sample.meta


# --- npy -------------------------------------------------------------------------------------

ARRAYS = [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4),
    np.array([[True, False, True]]),
    np.arange(5, dtype=np.uint8),
    np.arange(-6, 6, dtype=np.int16).reshape(3, 4),
    np.array([np.nan, -np.inf, 1.5], dtype=np.float32),
    np.zeros((0, 3), dtype=np.float32),
    np.array(7.0, dtype=np.float64),
    np.arange(6, dtype=">i4").reshape(2, 3),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_npy_round_trips_bit_for_bit_as_numpy_reads_it(array):
    stored = np.ascontiguousarray(array)  # what the writer stores (0-d arrays become 1-d)
    written = sf.npy_bytes(array)
    assert written == _np_save(stored)
    for data in (written, _np_save(array)):
        back = sf.npy_array(data)
        ref = np.load(io.BytesIO(data), allow_pickle=False)
        assert back.dtype == ref.dtype == array.dtype and back.shape == ref.shape
        assert back.tobytes() == ref.tobytes() == array.tobytes()
    assert sf.npy_array(_np_save(array)).shape == array.shape


def test_npy_decodes_fortran_order_and_views_the_buffer():
    array = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    buf = bytearray(_np_save(array))
    back = sf.npy_array(buf)
    np.testing.assert_array_equal(back, array)
    assert back.flags.f_contiguous
    assert np.shares_memory(back, np.frombuffer(buf, np.uint8))  # zero-copy
    assert not sf.npy_array(bytes(buf)).flags.writeable


def _np_save(array, **kwargs):
    buf = io.BytesIO()
    np.save(buf, array, **kwargs)
    return buf.getvalue()


def _npy_with_header(header: str) -> bytes:
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text


@pytest.mark.parametrize(
    "data, match",
    [
        (b"NOTNUMPY" * 4, "bad magic"),
        (_np_save(np.arange(4, dtype=np.float32))[:-1], "data bytes"),
        (_np_save(np.arange(4, dtype=np.float32)) + b"\0", "data bytes"),
        (_np_save(np.array([{"a": 1}], dtype=object), allow_pickle=True), "object"),
        (_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}"), None),
        (_npy_with_header("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,)}"), "fortran"),
        (_npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1.0,)}"), "shape"),
        (_npy_with_header("__import__('os').system('false')"), None),
    ],
    ids=["magic", "short", "long", "object", "extra-key", "fortran", "shape", "code"],
)
def test_npy_refuses_malformed_members(data, match):
    with pytest.raises(ValueError, match=match):
        sf.npy_array(data)


# --- json ------------------------------------------------------------------------------------


def test_json_member_bytes_and_value():
    obj = {"b": [1, 2.5, None], "a": "caf\u00e9 \u2192", "c": {"z": True, "y": "\n"}}
    data = sf.json_bytes(obj)
    assert data == (
        b'{\n "a": "caf\xc3\xa9 \xe2\x86\x92",\n "b": [\n  1,\n  2.5,\n  null\n ],\n'
        b' "c": {\n  "y": "\\n",\n  "z": true\n }\n}\n'
    )
    assert sf.json_value(data) == obj
    assert sf.json_value(memoryview(data)) == obj
    with pytest.raises(ValueError):
        sf.json_value(data[:-4])


# --- safetensors -----------------------------------------------------------------------------


def _tensors():
    rng = np.random.default_rng(1)
    return {
        "q.layer000.step001": rng.standard_normal((2, 3, 4, 8)).astype(np.float16),
        "k.layer000.step001": rng.standard_normal((2, 3, 4, 8)).astype(np.float16),
        "match_forward": rng.integers(0, 12, (1, 2, 5, 3)).astype(np.int64),
        "similarity": rng.random((1, 2, 5), dtype=np.float32),
        "mask": rng.random((4,)) > 0.5,
        "ids": np.arange(3, dtype=np.uint8),
        "empty": np.zeros((0, 2), np.float32),
    }


def test_safetensors_round_trip_against_the_writers_encoder():
    tensors = _tensors()
    blob = safetensors.numpy.save(tensors)  # what the build writes (sources.text_to_video)
    back = sf.safetensors_arrays(blob)
    assert list(back) == sorted(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert back[name].tobytes() == value.tobytes(), name
    picked = sf.safetensors_arrays(blob, lambda n: n.startswith("q."))
    assert list(picked) == ["q.layer000.step001"]
    buf = bytearray(blob)
    view = sf.safetensors_arrays(buf)["similarity"]
    assert np.shares_memory(view, np.frombuffer(buf, np.uint8))  # zero-copy


def _st(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


_F4 = {"dtype": "F32", "shape": [2]}
MALFORMED_ST = {
    "short": b"\x01\x00",
    "header-past-data": (1000).to_bytes(8, "little") + b"{}",
    "size-mismatch": _st({"a": {**_F4, "data_offsets": [0, 4]}}, b"\0" * 4),
    "past-the-end": _st({"a": {**_F4, "data_offsets": [0, 8]}}, b"\0" * 4),
    "gap": _st(
        {"a": {**_F4, "data_offsets": [0, 8]}, "b": {**_F4, "data_offsets": [12, 20]}},
        b"\0" * 20,
    ),
    "overlap": _st(
        {"a": {**_F4, "data_offsets": [0, 8]}, "b": {**_F4, "data_offsets": [4, 12]}},
        b"\0" * 12,
    ),
    "trailing-bytes": _st({"a": {**_F4, "data_offsets": [0, 8]}}, b"\0" * 9),
    "bf16": _st({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_ST))
def test_safetensors_refuses_what_the_library_refuses(name):
    blob = MALFORMED_ST[name]
    with pytest.raises(Exception):  # noqa: B017 - the library's own error types
        safetensors.numpy.load(blob)
    with pytest.raises(ValueError):
        sf.safetensors_arrays(blob)
    with pytest.raises(ValueError):  # also when the broken tensor is not asked for
        sf.safetensors_arrays(blob, lambda n: False)


# --- mp4 -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mp4():
    from datagen.sources.synthetic import SyntheticConfig, render_synthetic_video

    scenes = SyntheticConfig(num_frames=5, height=32, width=48, texture="smooth")
    frames = render_synthetic_video(scenes, seed=3).frames
    return frames, encode_video(frames, 8, VideoConfig())


def test_mp4_decodes_as_pyav_gives_it(mp4):
    import av

    frames, data = mp4
    with av.open(io.BytesIO(data)) as container:
        ref = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    out = sf.decode_video(data)
    assert out.dtype == sf.FRAME_DTYPE and out.shape == frames.shape == ref.shape
    np.testing.assert_array_equal(out, ref)
    assert np.abs(out.astype(int) - frames).mean() < 12  # lossy, but the same pictures


def test_mp4_options_are_views_of_the_stored_frames(mp4):
    _, data = mp4
    full = sf.decode_video(data)
    np.testing.assert_array_equal(sf.decode_video(data, 2), full[::2])
    scaled = sf.decode_video(data, dtype="float32", channels_first=True)
    assert scaled.dtype == np.float32 and scaled.shape == (5, 3, 32, 48)
    np.testing.assert_allclose(scaled, full.transpose(0, 3, 1, 2) / 255, atol=1e-6)
    assert sf.decode_video(data, size=(16, 24)).shape == (5, 16, 24, 3)
    np.testing.assert_array_equal(sf.decode_video(data, threads=2), full)
    with pytest.raises(Exception):  # noqa: B017 - PyAV's error types
        sf.decode_video(data[: len(data) // 3])


def test_the_reader_and_the_build_share_the_mp4_decoder(mp4):
    from datagen import video
    from datagen.data import VideoSpec, decode_frames

    _, data = mp4
    assert video.decode_video is sf.decode_video
    np.testing.assert_array_equal(decode_frames(data), sf.decode_video(data))
    spec = VideoSpec(stride=3, size=(8, 12), dtype="float16", channels_first=True)
    np.testing.assert_array_equal(
        decode_frames(data, spec),
        sf.decode_video(data, 3, size=(8, 12), dtype="float16", channels_first=True),
    )


# --- tar -------------------------------------------------------------------------------------


def _hand_built_tar(fmt: int = tarfile.PAX_FORMAT) -> tuple[bytes, dict[str, dict[str, bytes]]]:
    """A tar written with the standard library, not datagen's writer: a name longer than 100
    bytes (a PAX or GNU long-name header), members of one block and just over, an empty
    member, a directory and a symlink (both skipped)."""
    long_key = "k" * 120
    samples = {
        "a-r00": {"json": b'{"a": 1}\n', "tracks.npy": bytes(range(256)) * 2, "mp4": b""},
        long_key: {"masks.npy": b"\x01" * 513},
        "b-r00": {"corr.safetensors": b"x" * 1000},
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        d = tarfile.TarInfo("dir-r00.d")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1234567890
                tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link-r00.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "a-r00.mp4"
        tar.addfile(link)
    return buf.getvalue(), samples


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_a_hand_built_tar_reads_back_exactly(tmp_path, fmt):
    data, samples = _hand_built_tar(fmt)
    assert dict(sf.read_tar(data)) == samples
    path = tmp_path / "core-000000.tar"
    path.write_bytes(data)
    assert list(sf.read_tar(path)) == list(samples.items())
    # Offsets and sizes agree with the standard library's reading of the same bytes.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        ref = {i.name: (i.offset_data, i.size) for i in tar if i.isfile()}
    reader = sf.Reader(io.BytesIO(data), "t.tar", size=len(data))
    got = {m.name: (m.offset, m.size) for m, _ in sf.iter_members(reader)}
    assert got == ref


def test_the_writers_tar_reads_back_exactly():
    samples = {
        "k1-r00": {"json": sf.json_bytes({"k": 1}), "tracks.npy": sf.npy_bytes(np.ones(3))},
        "k0-r00": {"mp4": b"\0" * 700, "qk.safetensors": safetensors.numpy.save({})},
    }
    assert dict(sf.read_tar(tar_bytes(samples))) == samples
    assert [k for k, _ in sf.read_tar(tar_bytes(samples))] == ["k0-r00", "k1-r00"]


def test_damaged_tars_raise_naming_the_shard_and_key(tmp_path):
    data, _ = _hand_built_tar()
    end = data.index(b"x" * 1000)  # the data of b-r00.corr.safetensors
    path = tmp_path / "core-000003.tar"
    path.write_bytes(data[: end + 10])
    with pytest.raises(sf.TruncatedShardError, match=r"^core-000003.tar: b-r00.corr.safetensors"):
        list(sf.read_tar(path))
    with pytest.raises(sf.TruncatedShardError, match="no end-of-archive marker"):
        list(sf.read_tar(data[: (end + 1000 + 511) // 512 * 512]))
    flipped = bytearray(data)
    flipped[end - 512 + 10] ^= 0x01  # inside the header block of b-r00.corr.safetensors
    with pytest.raises(sf.CorruptShardError, match="bad tar header checksum"):
        list(sf.read_tar(bytes(flipped)))


def test_a_tar_member_with_an_unsafe_name_is_refused_and_never_written():
    with pytest.raises(ValueError, match="unsafe sample key"):
        tar_bytes({"../x": {"mp4": b""}})
    with pytest.raises(ValueError, match="unsafe sample key"):
        tar_bytes({"dot.key": {"mp4": b""}})
    with pytest.raises(ValueError, match="unsafe member name"):
        tar_bytes({"x": {"a/b": b""}})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("../escape-r00.mp4")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"\0"))
    with pytest.raises(sf.CorruptShardError, match="unsafe"):
        list(sf.read_tar(buf.getvalue()))


# --- imports ---------------------------------------------------------------------------------


def test_the_writer_side_imports_the_format_without_the_reader_or_heavy_libraries():
    code = (
        "import sys, datagen.sampleformat, datagen.sample, datagen.shards, datagen.index\n"
        "heavy = ('datagen.data', 'torch', 'av', 'safetensors', 'cv2')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
