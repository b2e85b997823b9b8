"""`datagen analyse D --report R` end to end: a tiny `--source synthetic` build with capture,
its numbers against a naive pass over the build, and the HTML report in headless Chromium."""

from __future__ import annotations

import csv
import functools
import http.server
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from datagen.build import prepare_build, run_build
from datagen.data import open_dataset
from datagen.presets import resolve_config
from tests.conftest import analyse_report

BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser")


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    # The shipped tiny DiT on its own synthetic distribution: exact tracks, correspondence
    # for layers 4-5 x steps 4-5, q/k stored for the same cells.
    out = tmp_path_factory.mktemp("report") / "syn"
    cfg = resolve_config("tiny", None, ["source.kind=synthetic", "source.num_videos=3"])
    run_build(prepare_build(cfg, None, out), progress=False)
    return out


@pytest.fixture(scope="module")
def report(build: Path) -> tuple[Path, dict]:
    return analyse_report(build)


def _naive(build: Path, thr: float) -> dict:
    """Per (layer, step): the README's definitions, a point and a frame at a time."""
    out: dict = {}
    for s in open_dataset(build, video=False):
        meta, corr = s["meta"], s["correspondence"]
        lay = meta["layout"]
        th, tw = lay["token_pixel_size"]
        f_count, h, w = lay["token_grid"]
        cap = meta["capture"]
        first = [n for n in range(len(s["queries"])) if s["queries"][n, 0] == 0]
        for li, layer in enumerate(cap["corr_layers"]):
            for si, step in enumerate(cap["corr_steps"]):
                c = out.setdefault((layer, step), dict.fromkeys(("n", "px", "tok", "conf"), 0.0))
                for row, n in enumerate(first):
                    if not s["visible"][n, 0]:
                        continue
                    for j in range(1, f_count):
                        x, y = s["tracks"][n, j]  # tiny: no temporal compression
                        if not s["visible"][n, j] or not (0 <= x < 32 and 0 <= y < 32):
                            continue
                        m = int(corr["match_forward"][li, si, row, j])
                        cx, cy = (m % w + 0.5) * tw, (m // w + 0.5) * th
                        c["n"] += 1
                        c["px"] += math.hypot(cx - x, cy - y) < thr
                        c["tok"] += abs(cx - x) <= tw and abs(cy - y) <= th
                        c["conf"] += float(corr["confidence"][li, si, row, j])
    return out


def _rows(data: dict, group="all", source="correspondence") -> dict:
    return {
        (r["layer"], r["step"]): r
        for r in data["matching"]
        if r["group"] == group and r["source"] == source
    }


def test_report_numbers_equal_a_naive_pass_over_the_build(build, report):
    _, data = report
    thr = data["settings"]["threshold_px"]
    assert thr == pytest.approx(8 * math.sqrt(32 * 32 / (480 * 720)))
    naive = _naive(build, thr)
    rows = _rows(data)
    assert set(rows) == set(naive) == {(4, 4), (4, 5), (5, 4), (5, 5)}
    for cell, c in naive.items():
        r = rows[cell]
        assert r["pairs"] == c["n"] > 0
        assert r["accuracy_px"] == pytest.approx(100 * c["px"] / c["n"])
        assert r["accuracy_token"] == pytest.approx(100 * c["tok"] / c["n"])
        assert r["confidence"] == pytest.approx(c["conf"] / c["n"], rel=1e-5)
        split = r["mass_text"] + r["mass_own_frame"] + r["mass_other_frames"]
        assert split == pytest.approx(1.0, abs=1e-3)
    # One category and one set here: each group holds every video and equals "all".
    assert data["counts"]["groups"] == {"all": 3, "category=synthetic": 3, "set=object": 3}
    assert _rows(data, "category=synthetic") == {
        k: v | {"group": "category=synthetic"} for k, v in rows.items()
    }
    assert data["counts"]["ground_truth"] == {"exact": 3}
    # q/k recomputed in fp16 find the same matches as the online correspondence (fp32).
    for cell, r in _rows(data, source="q/k").items():
        assert r["accuracy_token"] == pytest.approx(rows[cell]["accuracy_token"], abs=1.0)
    # The ranking, recomputed naively from the rows above (--rank-by token): each term min-max
    # normalised over the layer x step table, a cell's score their harmonic mean (0 if any
    # term is 0), a layer's the mean of its cells; the summary's best layer tops it.
    terms = {
        cell: (r["accuracy_token"], r["confidence"], r["mass_other_frames"])
        for cell, r in rows.items()
    }
    lows = [min(t[i] for t in terms.values()) for i in range(3)]
    highs = [max(t[i] for t in terms.values()) for i in range(3)]
    score = {}
    for cell, t in terms.items():
        norm = [(t[i] - lows[i]) / (highs[i] - lows[i]) for i in range(3)]
        score[cell] = 0.0 if min(norm) <= 0 else 3.0 / sum(1.0 / v for v in norm)
    layer_means = {
        layer: sum(v for (ly, _), v in score.items() if ly == layer) / 2 for layer in (4, 5)
    }
    ranked = data["ranking"]["all"]["layers"]
    assert [r["layer"] for r in ranked] == sorted(layer_means, key=lambda ly: -layer_means[ly])
    for r in ranked:
        assert r["score"] == pytest.approx(layer_means[r["layer"]])
    for c in data["ranking"]["all"]["cells"]:
        assert c["score"] == pytest.approx(score[(c["layer"], c["step"])])
    assert data["summary"]["best_layer"] == ranked[0]["layer"]


def test_tracking_scores_the_no_motion_baseline_as_a_naive_reference(build, report):
    _, data = report
    per_video = []
    for s in open_dataset(build, video=False):
        first = np.flatnonzero((s["queries"][:, 0] == 0) & s["visible"][:, 0])
        tr, vis = s["tracks"][first] * 8, s["visible"][first]  # 32 px -> 256 px
        d = np.linalg.norm(tr[:, 1:] - tr[:, :1], axis=-1)
        v = vis[:, 1:]
        per_video.append(np.mean([(v & (d < t)).sum() / v.sum() for t in (1, 2, 4, 8, 16)]))
    row = next(r for r in data["tracking"] if r["group"] == "all" and r["method"] == "no motion")
    assert row["delta_avg"] == pytest.approx(100 * np.mean(per_video))
    assert row["ground_truth"] == "exact" and row["videos"] == 3
    methods = {(r["method"], r["source"]) for r in data["tracking"] if r["group"] == "all"}
    assert methods == {
        ("attention argmax", "correspondence"),
        ("attention soft-argmax", "correspondence"),
        ("attention argmax", "q/k"),
        ("attention soft-argmax r", "q/k"),
        ("no motion", "baseline"),
        ("pixel patches", "baseline"),
    }


def test_exact_labelled_videos_are_also_scored_against_the_builds_tracker(build, report):
    """A synthetic build's videos are re-labelled by the build's configured tracker, and every
    zero-shot tracker is scored against those pseudo labels too: here the no-motion baseline
    against a naive pass that runs the same tracker itself."""
    from datagen.track.registry import make_tracker

    _, data = report
    per_video = []
    for s in open_dataset(build):
        cfg = s["meta"]["config"]["tracker"]
        first = np.flatnonzero((s["queries"][:, 0] == 0) & s["visible"][:, 0])
        queries = s["queries"][first].astype(np.float32)
        res = make_tracker(cfg["name"], **cfg["settings"]).track(s["frames"], queries)
        tr, vis = res.tracks.astype(np.float64) * 8, res.visible  # 32 px -> 256 px
        q = s["queries"][first, 1:] * 8
        d = np.linalg.norm(tr[:, 1:] - q[:, None], axis=-1)
        v = vis[:, 1:]
        per_video.append(np.mean([(v & (d < t)).sum() / v.sum() for t in (1, 2, 4, 8, 16)]))
    rows = [r for r in data["tracking"] if r["group"] == "all" and r["labels"] == "re-tracked"]
    assert {r["ground_truth"] for r in rows} == {"pseudo (lk_recover)"}
    own = [r for r in data["tracking"] if r["group"] == "all" and r["labels"] == "own"]
    assert {(r["method"], r["source"]) for r in rows} == {(r["method"], r["source"]) for r in own}
    still = next(r for r in rows if r["method"] == "no motion")
    assert still["delta_avg"] == pytest.approx(100 * np.mean(per_video))
    assert any("labels 're-tracked'" in n for n in data["notes"])


def test_csv_tables_hold_the_json_rows(report):
    out, data = report
    for name, rows in (("matching", data["matching"]), ("tracking", data["tracking"])):
        with open(out / f"{name}.csv", newline="") as f:
            got = list(csv.DictReader(f))
        assert len(got) == len(rows)
        for g, r in zip(got, rows, strict=True):
            for col, value in g.items():
                want = r[col]
                if want is None:
                    assert value == ""
                elif isinstance(want, float):
                    assert float(value) == pytest.approx(want)
                else:
                    assert value == str(want)


def test_report_figures_exist_and_the_readme_screenshot_is_small(report):
    out, data = report
    files = [f["file"] for f in data["figures"]]
    for name in ("accuracy_heatmap", "accuracy_vs_step", "confidence_split", "ranking"):
        assert f"figures/{name}.png" in files
    assert any(f.startswith("figures/tracks-") and f.endswith(".mp4") for f in files)
    assert any(f.startswith("figures/attention-") for f in files)
    for f in files:
        assert (out / f).stat().st_size > 1000
    shot = Path(__file__).resolve().parents[1] / "docs" / "analysis-report.png"
    assert shot.exists() and shot.stat().st_size <= 300_000


def _browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _check_page(page, data: dict) -> None:
    """The DOM against report.json: every table cell, every image, the summary."""
    from datagen.analysis.report import DECIMALS

    def check_table(table_id: str, rows: list[dict]) -> None:
        cells = page.eval_on_selector_all(
            f"#{table_id} tbody tr",
            "rows => rows.map(r => Object.fromEntries([...r.cells].map("
            "c => [c.dataset.col, c.textContent])))",
        )
        assert len(cells) == len(rows) > 0, table_id
        for dom, want in zip(cells, rows, strict=True):
            for col, text in dom.items():
                value = want[col]
                if value is None:
                    assert text == "n/a", (table_id, col)
                elif isinstance(value, float):
                    tol = 0.51 * 10 ** -DECIMALS.get(col, 2)
                    assert abs(float(text) - value) <= tol, (table_id, col, text, value)
                else:
                    assert text == str(value), (table_id, col)

    check_table("matching", data["matching"])
    check_table("tracking", data["tracking"])
    check_table("ranking-cells", data["ranking"]["all"]["cells"])
    check_table("ranking-layers", data["ranking"]["all"]["layers"])
    images = page.eval_on_selector_all(
        "img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    pngs = [f["file"] for f in data["figures"] if f["file"].endswith(".png")]
    assert sorted(src for src, _, _ in images) == sorted(pngs)
    assert all(ok and width > 0 for _, ok, width in images), images
    videos = page.eval_on_selector_all("video", "vs => vs.map(v => v.getAttribute('src'))")
    assert sorted(videos) == sorted(
        f["file"] for f in data["figures"] if f["file"].endswith(".mp4")
    )
    s = data["summary"]
    text = {
        key: page.text_content(f"#summary-{key}")
        for key in ("videos-used", "points-used", "best-layer", "best-cell-accuracy-token")
    }
    assert int(text["videos-used"]) == s["videos_used"] == 3
    assert int(text["points-used"]) == s["points_used"]
    assert int(text["best-layer"]) == s["best_layer"]
    assert float(text["best-cell-accuracy-token"]) == pytest.approx(
        s["best_cell_accuracy_token"], abs=0.006
    )
    assert float(page.text_content("#summary-best-tracker-delta-avg")) == pytest.approx(
        s["best_tracker"]["delta_avg"], abs=0.006
    )
    assert page.text_content("#fingerprint") == data["build"]["config_fingerprint"]
    assert "excluded" in page.text_content("#counts")


def test_report_renders_in_headless_chromium_from_disk_and_over_http(report):
    exe = _browser()
    if exe is None:
        pytest.skip(
            f"no headless Chromium ({', '.join(BROWSERS)}): apt-get install chromium-headless-shell"
        )
    from playwright.sync_api import sync_playwright

    out, data = report
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            for url in ((out / "index.html").as_uri(), f"http://127.0.0.1:{server.server_port}/"):
                page.goto(url, wait_until="load")
                _check_page(page, data)
            browser.close()
    finally:
        server.shutdown()


def test_bad_report_arguments_get_one_line(build, run_cli, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = [
        (["--report", tmp_path / "file"], "is a file"),
        (["--report", tmp_path / "busy"], "holds no earlier report"),
        (["--report", tmp_path / "no" / "R"], "does not exist"),
        (["--report", tmp_path / "R", "--threshold-px", "-1"], "--threshold-px -1.0"),
        (["--report", tmp_path / "R", "--examples", "-2"], "--examples -2"),
    ]
    for argv, message in cases:
        code, _, err = run_cli("analyse", build, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "R").exists()


def _fake_sample(rng, key: str, category: str, set_: str) -> dict:
    from datagen.layout import TokenLayout

    lay = TokenLayout("cogvideox", 9, 48, 80, (4, 8, 8), (1, 2, 2), 4, "first")
    n, f, t = 12, 3, 15
    qxy = rng.uniform(0, [80, 48], size=(n, 2))
    tracks = qxy[:, None] + rng.normal(0, 8, size=(n, 9, 2))
    return {
        "key": key,
        "meta": {
            "layout": lay.to_json(),
            "capture": {"corr_layers": [3], "corr_steps": [1], "step_timesteps": {"1": 500}},
            "prompt": {"category": category, "set": set_},
            "tracker": {"name": "cotracker3_offline"},
        },
        "queries": np.concatenate([np.zeros((n, 1)), qxy], axis=1),
        "tracks": tracks,
        "visible": rng.random((n, 9)) < 0.8,
        "correspondence": {
            "match_forward": rng.integers(0, t, size=(1, 1, n, f)),
            "soft_forward": rng.uniform(0, 5, size=(1, 1, n, f, 2)),
            "match_reverse": rng.integers(0, t, size=(1, 1, f, t)),
            "confidence": rng.random((1, 1, n, f)),
            "mass_text": rng.random((1, 1, n)),
            "mass_own_frame": rng.random((1, 1, n)),
            "mass_other_frames": rng.random((1, 1, n)),
        },
    }


def test_groups_pool_each_category_and_set_and_all_is_their_sum():
    from datagen.analysis.collect import StudyOptions, _Collector

    rng = np.random.default_rng(0)
    specs = [("a", "object"), ("b", "object"), ("a", "scene"), ("b", "scene"), ("a", "object")]
    samples = [_fake_sample(rng, f"v{i}", c, s) for i, (c, s) in enumerate(specs)]
    alone = []
    for s in samples:
        one = _Collector(StudyOptions(qk=False))
        one.video(s)
        alone.append(one.study.corr["all"])
    col = _Collector(StudyOptions(qk=False))
    for s in samples:
        col.video(s)
    study = col.study
    assert study.groups == ["all", "category=a", "category=b", "set=object", "set=scene"]
    for group, members in (
        ("all", [0, 1, 2, 3, 4]),
        ("category=a", [0, 2, 4]),
        ("category=b", [1, 3]),
        ("set=object", [0, 1, 4]),
        ("set=scene", [2, 3]),
    ):
        np.testing.assert_allclose(study.corr[group], sum(alone[i] for i in members))
        videos = study.tracking[group][("no motion", "", -1, -1)]
        assert len(videos) == len(members)
    assert {v["ground_truth"] for v in study.videos} == {"pseudo (cotracker3_offline)"}


def test_left_out_videos_and_points_are_counted_with_their_reason():
    from datagen.analysis.collect import StudyOptions, _Collector
    from datagen.sample import QC_FLAG_BITS

    rng = np.random.default_rng(1)
    kept = _fake_sample(rng, "kept", "a", "object")
    kept["visible"][:, 0] = True
    kept["visible"][0, 0] = False
    kept["qc_flags"] = np.zeros(12, np.uint8)
    kept["qc_flags"][[1, 2]] = next(iter(QC_FLAG_BITS.values()))
    bare = _fake_sample(rng, "bare", "a", "object") | {"correspondence": None}
    col = _Collector(StudyOptions(qk=False))
    for s in (kept, bare):
        col.video(s)
    assert col.study.excluded == [
        {"key": "bare", "reason": "no correspondence arrays (capture.corr_layers is empty)"}
    ]
    assert col.study.points_left_out == {
        "not visible on frame 0": 1,
        "rejected by quality control": 2,
    }
    assert [v["points"] for v in col.study.videos] == [9]
    every = _Collector(StudyOptions(qk=False, kept_only=False))
    every.video(kept)
    assert [v["points"] for v in every.study.videos] == [11]
