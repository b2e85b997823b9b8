"""End to end: a tiny synthetic build with ``capture.hidden_layers``, analysed with
``--report``: the report has block-output feature rows (matching and zero-shot tracking,
"features" / cosine) beside q/k, and their numbers equal a naive recomputation."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from datagen.cli import main
from datagen.data import FeatureSpec, open_dataset
from datagen.sampleformat import FEATURE_MEMBER
from tests.conftest import analyse_report

HIDDEN = [2, 5]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hidden") / "syn"
    code = main(
        ["build", "--source", "synthetic", "--out", str(out), "--quiet"]
        + ["--set", "source.num_videos=3", "--set", f"capture.hidden_layers={HIDDEN}"]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def report(build: Path) -> tuple[Path, dict]:
    return analyse_report(build)


def _naive(build: Path, thr: float) -> tuple[dict, dict]:
    """Per (layer, step): cosine argmax a point and a frame at a time (float64), scored by the
    README's definitions; and per-video argmax delta_avg at 256x256 (tiny: 32 px, no temporal
    compression, so token frame j is video frame j)."""
    sums: dict = {}
    deltas: dict = {}
    for s in open_dataset(build, video=False, features=FeatureSpec(kinds=["h"])):
        lay = s["meta"]["layout"]
        th, tw = lay["token_pixel_size"]
        f_count, h, w = lay["token_grid"]
        names = sorted(s["features"])
        assert names and all(n.startswith("h.") for n in names)
        first = [n for n in range(len(s["queries"])) if s["queries"][n, 0] == 0]
        first = [n for n in first if s["visible"][n, 0]]
        for name in names:
            layer, step = int(name[7:10]), int(name[15:18])
            x = s["features"][name].astype(np.float64)
            assert x.shape[:2] == (f_count, h * w)
            c = sums.setdefault((layer, step), dict.fromkeys(("n", "px", "tok"), 0.0))
            per_thr = {t: [0, 0] for t in (1, 2, 4, 8, 16)}
            for n in first:
                qx, qy = s["queries"][n, 1:]
                q0 = x[0, int(qy // th) * w + int(qx // tw)]
                for j in range(1, f_count):
                    sims = [
                        q0 @ x[j, i] / np.linalg.norm(q0) / np.linalg.norm(x[j, i])
                        for i in range(h * w)
                    ]
                    m = int(np.argmax(sims))
                    cx, cy = (m % w + 0.5) * tw, (m // w + 0.5) * th
                    lx, ly = s["tracks"][n, j]
                    if not s["visible"][n, j]:
                        continue
                    d256 = math.hypot(cx - lx, cy - ly) * 256 / 32
                    for t in per_thr:
                        per_thr[t][0] += d256 < t
                        per_thr[t][1] += 1
                    if not (0 <= lx < 32 and 0 <= ly < 32):
                        continue
                    c["n"] += 1
                    c["px"] += math.hypot(cx - lx, cy - ly) < thr
                    c["tok"] += abs(cx - lx) <= tw and abs(cy - ly) <= th
            deltas.setdefault((layer, step), []).append(
                np.mean([a / b for a, b in per_thr.values()])
            )
    return sums, deltas


def test_hidden_states_are_stored_and_valid(build):
    assert main(["validate", str(build)]) == 0
    s = next(iter(open_dataset(build, video=False, features=True)))
    f, h, w = s["meta"]["layout"]["token_grid"]
    hidden = {k: v for k, v in s["features"].items() if k.startswith("h.")}
    assert sorted(hidden) == [f"h.layer{la:03d}.step{st:03d}" for la in HIDDEN for st in (4, 5)]
    for v in hidden.values():
        assert v.dtype == np.float16 and v.shape == (f, h * w, 4 * 32)  # 4 heads x 32 wide
    assert sorted(s["features"]) == sorted(s["meta"]["capture"]["feature_tensors"])
    assert s["meta"]["config"]["capture"]["hidden_layers"] == HIDDEN
    # The reader's filter picks by kind.
    only_q = next(iter(open_dataset(build, video=False, features=FeatureSpec(kinds=["q"]))))
    assert all(k.startswith("q.") for k in only_q["features"])
    with pytest.raises(ValueError, match=r"FeatureSpec.kinds \['v'\]"):
        FeatureSpec(kinds=["v"])
    assert FEATURE_MEMBER == "qk.safetensors"


def test_feature_rows_equal_a_naive_recomputation(build, report):
    out, data = report
    thr = data["settings"]["threshold_px"]
    sums, deltas = _naive(build, thr)
    rows = {
        (r["layer"], r["step"]): r
        for r in data["matching"]
        if r["group"] == "all" and r["source"] == "features"
    }
    assert set(rows) == set(sums) == {(la, st) for la in HIDDEN for st in (4, 5)}
    assert data["hidden_pairs"] == [[la, st] for la in HIDDEN for st in (4, 5)]
    for cell, c in sums.items():
        r = rows[cell]
        assert r["method"] == "cosine" and r["pairs"] == c["n"] > 0
        assert r["accuracy_px"] == pytest.approx(100 * c["px"] / c["n"])
        assert r["accuracy_token"] == pytest.approx(100 * c["tok"] / c["n"])
        assert r["reverse_accuracy_px"] is None and r["confidence"] is None
    tracks = {
        (r["layer"], r["step"]): r
        for r in data["tracking"]
        if r["group"] == "all" and r["source"] == "features" and r["labels"] == "own"
    }
    assert set(tracks) == set(deltas)
    for cell, per_video in deltas.items():
        assert tracks[cell]["method"] == "cosine argmax" and tracks[cell]["videos"] == 3
        assert tracks[cell]["delta_avg"] == pytest.approx(100 * np.mean(per_video))
    # q/k rows stay beside them, and the best zero-shot tracker is still an attention one.
    assert {r["source"] for r in data["matching"]} >= {"correspondence", "q/k", "features"}
    assert data["summary"]["best_tracker"]["source"] != "features"
    with open(out / "matching.csv", newline="") as f:
        got = [r for r in csv.DictReader(f) if r["source"] == "features"]
    assert len(got) == len([r for r in data["matching"] if r["source"] == "features"])
    page = (out / "index.html").read_text()
    tracked = [r for r in data["tracking"] if r["source"] == "features"]
    assert len(tracked) == 2 * len(got)  # against the exact labels and the re-tracked ones
    assert page.count('<td data-col="source" class=t>features</td>') == len(got) + len(tracked)
    assert "block-output features (matched by cosine" in page


def test_check_capture_names_a_malformed_hidden_tensor(build):
    import safetensors.numpy

    from datagen.check import check_capture

    s = next(iter(open_dataset(build, video=False, features=True)))
    meta, feats = s["meta"], {k: np.array(v) for k, v in s["features"].items()}
    assert check_capture(meta, features=safetensors.numpy.save(feats)) == []
    name = f"h.layer{HIDDEN[0]:03d}.step004"
    bad = dict(feats)
    bad[name] = feats[name][None]  # 4-D, like q/k: not a block output
    errs = check_capture(meta, features=safetensors.numpy.save(bad))
    assert len(errs) == 1 and errs[0].startswith(f"{name} is float16 (1, ")
    assert "expected float16 (" in errs[0] and "model width)" in errs[0]
    bad[name] = feats[name].astype(np.float32)
    assert "expected float16" in check_capture(meta, features=safetensors.numpy.save(bad))[0]
    del bad[name]
    assert "differ from metadata" in check_capture(meta, features=safetensors.numpy.save(bad))[0]
