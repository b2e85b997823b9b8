"""CoTracker3 adapter (datagen.track.cotracker) against a stand-in hub repository.

What is mocked and why: the real model needs its weights (a download) and minutes of CPU per
clip, and GitHub cannot be reached here. So each test writes a small torch.hub directory in
tmp_path whose ``hubconf.py`` has the real entry names (``cotracker3_offline``,
``cotracker3_online``) and returns what the real entries return: a predictor whose ``.model``
has the real call signature and output layout (coords (B,T,N,2), visibility and confidence
probabilities (B,T,N), train data) and the real online protocol
(``init_video_online_processing``, windows of at most ``window_len`` frames, accumulated
outputs). Its outputs are KNOWN functions of the input: every test video frame t is a constant
image of value 8 t + 5, the stand-in reads that frame id back from the (resized) video, and
predicts, in model (384x512, pixel-centre) coordinates,

    position = query + (id(t) - id(t_q)) * (1, 2) + offset   (offset: a buffer, 0 by default)
    visibility = 0.95 for even ids, 0.3 for odd ids;  confidence = 1 - 0.02 id

so expected raster outputs can be computed by hand, and reversed or misaligned clips would show.
The adapter loads it through the real ``torch.hub.load(..., source="local")``. Network access
is never attempted: ``torch.hub.urlopen`` is replaced by a function that raises the URLError
seen offline, and TORCH_HOME points into tmp_path (no cache). A single run against the real
co-tracker code (random weights) is reported in the adapter's development notes, not here.
"""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch

from datagen.errors import UserError
from datagen.track.base import Tracker
from datagen.track.cotracker import CoTrackerTracker, support_grid
from datagen.track.registry import TRACKER_FACTORIES, make_tracker

H, W = 30, 50  # deliberately not 3:4, so x and y scale differently
HM, WM = 384, 512
SX, SY = (W - 1) / (WM - 1), (H - 1) / (HM - 1)  # model -> video scale (align_corners=True)

HUBCONF = r'''
import torch

URL = "https://huggingface.co/facebook/cotracker3/resolve/main/scaled_offline.pth"


class _Base(torch.nn.Module):
    def __init__(self, window_len):
        super().__init__()
        self.window_len = window_len
        self.stride = 4
        self.model_resolution = (384, 512)
        self.register_buffer("offset", torch.zeros(2))
        self.calls = []  # (clip frame ids, number of queries, iters) per call

    @staticmethod
    def frame_ids(video):
        assert video.dtype == torch.float32 and tuple(video.shape[-3:]) == (3, 384, 512)
        return torch.round((video[0, :, 0, 0, 0] - 5.0) / 8.0)

    def predict(self, ids, queries, q_ids):
        """ids (T,) frame ids; queries (1, N, 3); q_ids (N,) query frame ids (nan: unseen)."""
        dt = ids[:, None] - q_ids[None, :]
        step = torch.tensor([1.0, 2.0])
        coords = queries[0, None, :, 1:3] + torch.nan_to_num(dt)[..., None] * step + self.offset
        T, N = dt.shape
        vis = torch.where(ids % 2 == 0, 0.95, 0.3)[:, None].expand(T, N)
        conf = (1.0 - 0.02 * ids)[:, None].expand(T, N)
        return coords[None], vis[None].clone(), conf[None].clone()


class Offline(_Base):
    def forward(self, video, queries, iters=4, is_train=False, add_space_attn=True,
                fmaps_chunk_size=200):
        ids = self.frame_ids(video)
        self.calls.append((ids.tolist(), queries.shape[1], iters))
        q_ids = ids[queries[0, :, 0].long()]
        coords, vis, conf = self.predict(ids, queries, q_ids)
        return coords, vis, conf, None


class Online(_Base):
    def init_video_online_processing(self):
        self.online_ind = 0
        self.seen = {}

    def forward(self, video, queries, iters=4, is_train=False, add_space_attn=True,
                fmaps_chunk_size=200, is_online=False):
        assert is_online, "the adapter must use the online protocol"
        T = video.shape[1]
        assert T <= self.window_len, "Online mode: video chunk must be <= window size."
        ids = self.frame_ids(video)
        self.calls.append((ids.tolist(), queries.shape[1], iters))
        for i, v in enumerate(ids.tolist()):
            if self.online_ind + i in self.seen:
                assert self.seen[self.online_ind + i] == v, "windows overlap inconsistently"
            self.seen[self.online_ind + i] = v
        total = self.online_ind + T  # outputs so far, as the real model accumulates them
        all_ids = torch.tensor([self.seen[i] for i in range(total)])
        qt = queries[0, :, 0].long()
        q_ids = torch.tensor([self.seen.get(int(t), float("nan")) for t in qt])
        coords, vis, conf = self.predict(all_ids, queries, q_ids)
        self.online_ind += self.window_len // 2
        return coords, vis, conf, None


class Predictor(torch.nn.Module):
    def __init__(self, model, pretrained):
        super().__init__()
        self.model = model
        self.interp_shape = model.model_resolution
        self.pretrained_arg = pretrained


def _make(online, pretrained):
    model = Online(16) if online else Offline(60)
    if pretrained:  # as the real hubconf: the authors' weights from their URL
        model.load_state_dict(torch.hub.load_state_dict_from_url(URL, map_location="cpu"))
    return Predictor(model, pretrained)


def cotracker3_offline(*, pretrained=True, **kwargs):
    return _make(False, pretrained)


def cotracker3_online(*, pretrained=True, **kwargs):
    return _make(True, pretrained)
'''


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network: torch.hub's urlopen fails as it does without a connection; empty hub cache."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known (test: offline)")

    monkeypatch.setattr(torch.hub, "urlopen", no_network)  # raising=True: torch must have it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("DATAGEN_COTRACKER_REPO", raising=False)
    monkeypatch.delenv("DATAGEN_COTRACKER_CHECKPOINT", raising=False)


@pytest.fixture
def hub_dir(tmp_path):
    d = tmp_path / "fake-co-tracker"
    d.mkdir()
    (d / "hubconf.py").write_text(HUBCONF)
    return d


def id_video(num_frames: int, h: int = H, w: int = W) -> np.ndarray:
    """Frame t is a constant image of value 8 t + 5 (the stand-in reads t back)."""
    assert num_frames <= 31, "ids must fit in uint8"
    vals = (8 * np.arange(num_frames) + 5).astype(np.uint8)
    return np.broadcast_to(vals[:, None, None, None], (num_frames, h, w, 3)).copy()


def expected_xy(q: np.ndarray, num_frames: int, offset=(0.0, 0.0)) -> np.ndarray:
    """Hand-derived raster positions (N, T, 2) for the stand-in's motion.

    raster -> model: x_m = (x - 0.5) / SX; model motion (t - t_q) * (1, 2) + offset;
    model -> raster: x = x_m * SX + 0.5. So x(t) = x_q + ((t - t_q) + ox) * SX and
    y(t) = y_q + (2 (t - t_q) + oy) * SY.
    """
    t = np.arange(num_frames)[None, :]
    dt = t - q[:, 0:1]
    x = q[:, 1:2] + (dt + offset[0]) * SX
    y = q[:, 2:3] + (2 * dt + offset[1]) * SY
    return np.stack([x, y], axis=-1)


def tracker(hub_dir, **kw) -> CoTrackerTracker:
    kw.setdefault("pretrained", False)
    return CoTrackerTracker(repo=str(hub_dir), device="cpu", **kw)


QUERIES = np.array(
    [[0, 10.5, 7.25], [3, 20.0, 12.0], [7, 49.9, 29.9], [3, 0.0, 0.0], [5, 25.0, 15.0]],
    np.float32,
)


@pytest.mark.parametrize("variant", ["cotracker3_offline", "cotracker3_online"])
def test_positions_shapes_and_query_frames(hub_dir, variant):
    frames = id_video(8)
    tr = tracker(hub_dir, variant=variant)
    res = tr.track(frames, QUERIES)
    assert isinstance(tr, Tracker) and tr.name == variant
    assert res.tracks.shape == (5, 8, 2) and res.tracks.dtype == np.float32
    assert res.visible.shape == (5, 8) and res.visible.dtype == np.bool_
    assert res.confidence.shape == (5, 8) and res.confidence.dtype == np.float32
    want = expected_xy(QUERIES.astype(np.float64), 8)
    np.testing.assert_allclose(res.tracks, want, atol=1e-4, rtol=0)
    # a query at t=3: before (backward pass) and after (forward pass) its frame, and at it
    np.testing.assert_allclose(res.tracks[1, 0], [20.0 - 3 * SX, 12.0 - 6 * SY], atol=1e-4)
    np.testing.assert_allclose(res.tracks[1, 7], [20.0 + 4 * SX, 12.0 + 8 * SY], atol=1e-4)
    rows = np.arange(5)
    tq = QUERIES[:, 0].astype(int)
    np.testing.assert_array_equal(res.tracks[rows, tq], QUERIES[:, 1:])  # exactly the query
    assert res.visible[rows, tq].all()
    np.testing.assert_array_equal(res.confidence[rows, tq], 1.0)


def test_hand_computed_conversion(hub_dir):
    """One point by hand: raster (10.5, 7.25) at t=0 in a 50x30 video, frame 2."""
    res = tracker(hub_dir).track(id_video(3), np.array([[0, 10.5, 7.25]], np.float32))
    x_m = (10.5 - 0.5) * 511 / 49 + 2 * 1  # = 104.2857... + 2
    y_m = (7.25 - 0.5) * 383 / 29 + 2 * 2  # = 89.1465... + 4
    np.testing.assert_allclose(
        res.tracks[0, 2], [x_m * 49 / 511 + 0.5, y_m * 29 / 383 + 0.5], atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(res.tracks[0, 2], [10.691781, 7.552872], atol=1e-4, rtol=0)


def test_confidence_kept_and_visibility_threshold(hub_dir):
    frames = id_video(8)
    q = np.array([[3, 20.0, 12.0]], np.float32)
    res = tracker(hub_dir).track(frames, q)
    t = np.arange(8)
    want_conf = np.where(t == 3, 1.0, 1.0 - 0.02 * t)  # un-reversed in the backward pass too
    np.testing.assert_allclose(res.confidence[0], want_conf, atol=1e-6)
    assert 0.0 <= res.confidence.min() and res.confidence.max() <= 1.0
    # vis * conf: even ids 0.95 * (1 - 0.02 t) = .95 .912 .874 .836; odd ids <= 0.3
    np.testing.assert_array_equal(res.visible[0], (t % 2 == 0) | (t == 3))
    strict = tracker(hub_dir, visibility_threshold=0.9).track(frames, q)
    np.testing.assert_array_equal(strict.visible[0], np.isin(t, [0, 2, 3]))
    none = tracker(hub_dir, visibility_threshold=1.0).track(frames, q)
    np.testing.assert_array_equal(none.visible[0], t == 3)  # only the query frame


def test_model_calls_trimmed_clips_support_grid_and_chunks(hub_dir):
    tr = tracker(hub_dir, max_points_per_call=2, iters=4)
    res = tr.track(id_video(8), QUERIES)
    calls = tr._model.calls
    # forward: queries with t < 7 -> [0, 3], [3, 5]; backward: t > 0 -> [3, 7], [3, 5]
    assert [c[0] for c in calls] == [
        list(range(0, 8)),
        list(range(3, 8)),
        list(range(7, -1, -1)),
        list(range(5, -1, -1)),
    ]
    assert all(c[1] == 2 + 36 and c[2] == 4 for c in calls)  # 6x6 support grid, iters
    one_call = tracker(hub_dir).track(id_video(8), QUERIES)
    np.testing.assert_array_equal(res.tracks, one_call.tracks)
    no_grid = tracker(hub_dir, support_grid_size=0)
    no_grid.track(id_video(8), QUERIES)
    assert all(c[1] <= 5 for c in no_grid._model.calls)


def test_support_grid_matches_cotracker():
    g = support_grid(6, HM, WM)
    assert g.shape == (36, 2)
    np.testing.assert_allclose(g[0], [8, 8])
    np.testing.assert_allclose(g[-1], [504, 376])
    np.testing.assert_allclose(g[1], [8 + 496 / 5, 8])  # row-major: x varies fastest
    np.testing.assert_allclose(support_grid(1, HM, WM), [[256, 192]])


def test_online_windows_long_video(hub_dir):
    """30 frames: windows of 16 with step 8 in both passes; positions stay exact."""
    frames = id_video(30)
    q = np.array([[0, 5.0, 5.0], [25, 30.0, 20.0], [29, 1.0, 2.0]], np.float32)
    tr = tracker(hub_dir, variant="cotracker3_online")
    res = tr.track(frames, q)
    np.testing.assert_allclose(res.tracks, expected_xy(q.astype(np.float64), 30), atol=1e-4)
    lengths = [len(c[0]) for c in tr._model.calls]
    assert max(lengths) == 16
    assert lengths == [16, 16, 14, 16, 16, 14]  # forward 0..29, backward 29..0


def test_checkpoint_loaded_weights_only(hub_dir, tmp_path, monkeypatch):
    ckpt = tmp_path / "scaled_offline.pth"
    torch.save({"offset": torch.tensor([3.0, -2.0])}, ckpt)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    # pretrained=True must not reach the hub weights when a checkpoint is given
    tr = tracker(hub_dir, checkpoint=str(ckpt), pretrained=True)
    res = tr.track(id_video(5), QUERIES[:2])
    assert seen == [True]
    assert tr._model.offset.tolist() == [3.0, -2.0]
    want = expected_xy(QUERIES[:2].astype(np.float64), 5, offset=(3.0, -2.0))
    want[np.arange(2), QUERIES[:2, 0].astype(int)] = QUERIES[:2, 1:]
    np.testing.assert_allclose(res.tracks, want, atol=1e-4)
    # a directory with the authors' file name, and a training-style {"model": ...} wrapper
    torch.save({"model": {"offset": torch.tensor([1.0, 1.0])}}, ckpt)
    tr2 = tracker(hub_dir, checkpoint=str(tmp_path))
    tr2.load()
    assert tr2._model.offset.tolist() == [1.0, 1.0]


def test_checkpoint_errors(hub_dir, tmp_path):
    with pytest.raises(UserError, match="file not found") as e:
        tracker(hub_dir, checkpoint=str(tmp_path / "missing.pth")).load()
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.pth"
    torch.save({"something_else": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="does not fit cotracker3_offline") as e:
        tracker(hub_dir, checkpoint=str(bad)).load()
    assert "\n" not in str(e.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="weights-only"):
        tracker(hub_dir, checkpoint=str(junk)).load()


def _assert_offline_message(err: UserError) -> None:
    msg = str(err)
    assert "\n" not in msg
    for part in ("repo=", "checkpoint=", "DATAGEN_COTRACKER_REPO", "DATAGEN_COTRACKER_CHECKPOINT"):
        assert part in msg, msg


def test_unreachable_github_repo():
    """torch.hub's real github path, with urlopen failing as offline: one-line UserError."""
    tr = CoTrackerTracker(repo="facebookresearch/co-tracker", pretrained=False)
    with pytest.raises(UserError, match="cannot reach CoTracker") as e:
        tr.track(id_video(4), QUERIES[:1])
    _assert_offline_message(e.value)


def test_unreachable_weights(hub_dir):
    """Local code but pretrained=True: the hub weight download fails offline."""
    with pytest.raises(UserError, match="cannot load CoTracker") as e:
        tracker(hub_dir, pretrained=True).load()
    _assert_offline_message(e.value)


def test_bad_repo_settings(tmp_path):
    with pytest.raises(UserError, match="no such directory") as e:
        CoTrackerTracker(repo=str(tmp_path / "nope" / "co-tracker")).load()
    _assert_offline_message(e.value)
    with pytest.raises(UserError, match="no hubconf.py"):
        CoTrackerTracker(repo=str(tmp_path)).load()
    with pytest.raises(UserError, match="no such directory"):
        CoTrackerTracker(repo="not a repo").load()


def test_registry_settings_roundtrip_and_lazy_load(hub_dir, monkeypatch):
    monkeypatch.setenv("DATAGEN_COTRACKER_REPO", str(hub_dir))
    loads = []
    real = torch.hub.load
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    for name in ("cotracker3_offline", "cotracker3_online"):
        assert name in TRACKER_FACTORIES
        tr = make_tracker(name, pretrained=False, device="cpu")
        assert tr._model is None and loads == []  # lazy: nothing loaded yet
        s = tr.settings()
        assert json.loads(json.dumps(s)) == s
        assert s["repo"] == str(hub_dir) and s["variant"] == name  # env resolved, recorded
        again = make_tracker(tr.name, **s)
        assert again.settings() == s
    with pytest.raises(ValueError, match="variant"):
        make_tracker("cotracker3_offline", variant="cotracker3_online")
    with pytest.raises(ValueError, match="unexpected keyword"):
        make_tracker("cotracker3_online", window=3)
    tr = make_tracker("cotracker3_offline", pretrained=False, device="cpu")
    tr.track(id_video(4), QUERIES[:1])
    tr.track(id_video(4), QUERIES[:1])
    assert len(loads) == 1  # cached per instance


def test_no_model_needed(monkeypatch):
    """No queries, or a single frame: answered without loading the model."""
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("model loaded"))
    tr = CoTrackerTracker(repo="/nonexistent")
    empty = tr.track(id_video(4), np.zeros((0, 3), np.float32))
    assert empty.tracks.shape == (0, 4, 2) and empty.confidence.shape == (0, 4)
    one = tr.track(id_video(1), QUERIES[:2, :] * [0, 1, 1])
    np.testing.assert_array_equal(one.tracks[:, 0], QUERIES[:2, 1:])
    assert one.visible.all() and (one.confidence == 1).all()


def test_random_state_untouched(hub_dir):
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    tracker(hub_dir).load()
    np.testing.assert_array_equal(torch.rand(3).numpy(), want.numpy())


@pytest.mark.parametrize(
    "kw",
    [
        {"variant": "cotracker2"},
        {"visibility_threshold": 1.5},
        {"visibility_threshold": True},
        {"iters": 0},
        {"max_points_per_call": 0},
        {"support_grid_size": -1},
        {"device": "toaster"},
        {"pretrained": "yes"},
        {"repo": ""},
    ],
)
def test_invalid_settings(kw):
    with pytest.raises(ValueError):
        CoTrackerTracker(**kw)
