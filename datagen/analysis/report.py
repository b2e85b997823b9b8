"""``datagen analyse D --report R``: the study as files a person opens from disk or over HTTP.

``R/report.json`` (everything, :func:`datagen.analysis.tables.report_data` plus the figures),
``R/matching.csv``, ``R/ranking.csv``, ``R/tracking.csv``, ``R/figures/*.png`` and ``*.mp4``,
and ``R/index.html``: a static page (no script, no network; relative links only) whose
tables and summary are rendered from the same dict that ``report.json`` holds.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from datagen.analysis import plots
from datagen.analysis import zeroshot as zs
from datagen.analysis.collect import ARGMAX, GROUP_ALL, Study, StudyOptions, collect, select_points
from datagen.analysis.tables import TRACK_METRICS, clean, report_data
from datagen.layout import TokenLayout

MATCH_COLUMNS = (
    ["group", "source", "method", "layer", "step", "timestep", "pairs", "moved_pairs"]
    + ["accuracy_px", "accuracy_token", "accuracy_token_moved"]
    + ["reverse_accuracy_px", "reverse_accuracy_token", "confidence"]
    + ["mass_text", "mass_own_frame", "mass_other_frames"]
)
RANK_COLUMNS = ["layer", "step", "timestep", "score", "accuracy", "confidence", "cross_frame"]
TRACK_COLUMNS = (
    ["group", "method", "source", "layer", "step", "timestep", "labels", "ground_truth"]
    + [
        "videos",
        "points",
    ]
    + [name for _, name in TRACK_METRICS]
)
DECIMALS = {"confidence": 4, "mass_text": 4, "mass_own_frame": 4, "mass_other_frames": 4}
DECIMALS |= {"score": 4, "cross_frame": 4}
"""Decimals shown in the HTML (default 2: percentages); the JSON keeps full precision."""


def fmt(column: str, value: Any) -> str:
    """How the HTML shows one cell."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{DECIMALS.get(column, 2)}f}"
    return str(value)


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    path.write_text(buf.getvalue())


def write_report(
    source: str | Path, out: Path, options: StudyOptions | None = None, rank_by: str = "px"
) -> dict[str, Any]:
    """Analyse a build and write the report folder ``out`` (created; files in it replaced)."""
    opts = options or StudyOptions()
    study, manifest = collect(source, opts)
    data = report_data(study, manifest, str(source), rank_by)
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figures = [
        _fig(plots.accuracy_heatmap(data, figdir / "accuracy_heatmap.png"), "Matching accuracy"),
        _fig(plots.accuracy_vs_step(data, figdir / "accuracy_vs_step.png"), "Accuracy by step"),
        _fig(
            plots.confidence_and_split(data, figdir / "confidence_split.png"),
            "Confidence and attention split",
        ),
        _fig(plots.ranking_chart(data, figdir / "ranking.png"), "Layer ranking"),
    ]
    figures += _examples(source, study, data, figdir)
    data["figures"] = [{**f, "file": str(Path(f["file"]).relative_to(out))} for f in figures]
    write_csv(out / "matching.csv", MATCH_COLUMNS, data["matching"])
    write_csv(out / "ranking.csv", ["group"] + RANK_COLUMNS, _ranking_rows(data))
    write_csv(out / "tracking.csv", TRACK_COLUMNS, data["tracking"])
    (out / "report.json").write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    (out / "index.html").write_text(render_html(data))
    return data


def _fig(path: Path, title: str, caption: str = "") -> dict[str, str]:
    return {"file": str(path), "title": title, "caption": caption}


def _ranking_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"group": g} | c for g, r in data["ranking"].items() for c in r["cells"]]


def _examples(source, study: Study, data: dict[str, Any], figdir: Path) -> list[dict[str, str]]:
    """Track overlays of the first few used videos (attention argmax from the correspondence at
    the best cell), and one query point's attention map where q/k are stored."""
    from datagen.data import open_dataset

    layout = study.layout
    assert layout is not None
    layer, step = _overlay_cell(data)
    li, si = study.layers.index(layer), study.steps.index(step)
    att = _attention_cell(study, data)
    keys = [v["key"] for v in study.videos[: study.options.examples]]
    ds = open_dataset(
        source,
        video=True,
        fields=["tracks", "visible", "queries", "correspondence", "meta", "qc_flags"],
        features=False,
    )
    out = []
    anchors = zs.anchors(layout)
    labels = [f"frame {vf}" for _, vf in anchors]
    scale = max(1, int(np.ceil(256 / layout.width)))
    for key in keys:
        sample = ds[key]
        first, use, _ = select_points(sample, study.options.kept_only)
        rows = first[use]
        qxy = np.asarray(sample["queries"])[rows, 1:].astype(np.float64)
        corr = sample["correspondence"]
        mf = np.asarray(corr["match_forward"][li, si])[use]
        mr = np.asarray(corr["match_reverse"][li, si])
        pred = zs.tracks_from_tokens(mf, qxy, layout)
        pvis = zs.cycle_visible(zs.reverse_of_forward(mf, mr), qxy, layout)
        vfs = [vf for _, vf in anchors]
        gt = np.asarray(sample["tracks"], np.float64)[rows][:, vfs]
        gvis = np.asarray(sample["visible"], bool)[rows][:, vfs]
        frames = np.asarray(sample["frames"])[vfs]
        images = plots.overlay_frames(frames, gt, gvis, pred, pvis, scale)
        what = f"attention argmax, layer {layer}, step {step}; squares: labels, dots: predictions"
        out.append(_fig(plots.track_strip(images, labels, figdir / f"tracks-{key}.png"), key, what))
        out.append(_fig(plots.track_video(images, figdir / f"tracks-{key}.mp4"), key, what))
        if att is not None and key == keys[0]:
            out.append(_attention(source, key, att, layout, rows, frames, gt, gvis, figdir))
    return out


def _overlay_cell(data: dict[str, Any]) -> tuple[int, int]:
    """The (layer, step) whose correspondence argmax tracks best (delta_avg over all videos);
    the best-ranked cell where no track was scored."""
    rows = [
        r
        for r in data["tracking"]
        if r["group"] == GROUP_ALL
        and r["labels"] == "own"
        and r["source"] == "correspondence"
        and r["method"] == ARGMAX
        and r["delta_avg"] is not None
    ]
    if rows:
        best = max(rows, key=lambda r: r["delta_avg"])
        return best["layer"], best["step"]
    s = data["summary"]
    return s["best_cell_layer"], s["best_cell_step"]


def _attention_cell(study: Study, data: dict[str, Any]) -> tuple[int, int] | None:
    """The best-ranked (layer, step) cell whose q/k are stored, or None."""
    for c in data["ranking"][GROUP_ALL]["cells"]:
        if (c["layer"], c["step"]) in study.feature_pairs:
            return c["layer"], c["step"]
    return None


def _attention(
    source, key: str, cell, layout: TokenLayout, rows, frames, gt, gvis, figdir: Path
) -> dict[str, str]:
    from datagen.data import FeatureSpec, open_dataset

    layer, step = cell
    ds = open_dataset(
        source,
        video=False,
        fields=["queries", "meta"],
        features=FeatureSpec(layers=[layer], steps=[step]),
    )
    feats = ds[key]["features"]
    q, k = feats[f"q.layer{layer:03d}.step{step:03d}"], feats[f"k.layer{layer:03d}.step{step:03d}"]
    # The point that moves most among those visible on every anchor frame (else the first).
    motion = np.where(gvis.all(1), np.linalg.norm(gt[:, -1] - gt[:, 0], axis=-1), -1.0)
    n = int(np.argmax(motion))
    qxy = gt[n, 0]
    token = int(layout.token_index_of_pixel(qxy))
    maps = zs.attention_maps(q, k, token, layout.token_grid[1:])
    maps = maps[[j for j, _ in zs.anchors(layout)]]
    titles = [f"frame {vf}" for _, vf in zs.anchors(layout)]
    title = (
        f"{key}: attention of the point at ({qxy[0]:.1f}, {qxy[1]:.1f}) on frame 0, "
        f"layer {layer}, step {step} (head mean; square: label)"
    )
    path = plots.attention_figure(
        frames, maps, qxy, gt[n], titles, title, figdir / f"attention-{key}.png"
    )
    return _fig(path, f"Attention map ({key})", title)


# --- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;padding:0 1em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#f3f3f3}td.t{text-align:left}
pre{background:#f7f7f7;padding:.5em;overflow:auto;max-height:20em;font-size:11px}
figure{display:inline-block;margin:.5em;vertical-align:top}figcaption{font-size:12px}
img{max-width:100%}dl{display:grid;grid-template-columns:max-content auto;gap:2px 14px}
dt{font-weight:bold}dd{margin:0}.note{color:#a40}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(table_id: str, columns: list[str], rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in columns)
    body = []
    for i, r in enumerate(rows):
        cells = "".join(
            f'<td data-col="{_esc(c)}"{"" if _num(r.get(c)) else " class=t"}>'
            f"{_esc(fmt(c, r.get(c)))}</td>"
            for c in columns
        )
        body.append(f'<tr data-row="{i}">{cells}</tr>')
    return (
        f'<table id="{_esc(table_id)}"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _summary(data: dict[str, Any]) -> str:
    s = data["summary"]
    items = [
        ("videos-used", "videos used", s["videos_used"]),
        ("points-used", "frame-0 points used", s["points_used"]),
        ("best-layer", "best layer (harmonic-mean ranking)", s["best_layer"]),
        ("best-cell-layer", "best cell: layer", s["best_cell_layer"]),
        ("best-cell-step", "best cell: step", s["best_cell_step"]),
        (
            "best-cell-accuracy-px",
            "best cell: accuracy within the px threshold (%)",
            s["best_cell_accuracy_px"],
        ),
        (
            "best-cell-accuracy-token",
            "best cell: accuracy within one token (%)",
            s["best_cell_accuracy_token"],
        ),
    ]
    bt = s["best_tracker"]
    if bt is not None:
        where = f"{bt['method']} ({bt['source']}), layer {bt['layer']}, step {bt['step']}"
        items += [
            ("best-tracker", "best zero-shot tracker", where),
            ("best-tracker-delta-avg", "its delta_avg", bt["delta_avg"]),
        ]
    dl = "".join(
        f'<dt>{_esc(label)}</dt><dd id="summary-{name}">{_esc(fmt("", value))}</dd>'
        for name, label, value in items
    )
    return f'<dl id="summary">{dl}</dl>'


def render_html(data: dict[str, Any]) -> str:
    """The report page for a :func:`write_report` dict."""
    st, c = data["settings"], data["counts"]
    fp = data["build"]["config_fingerprint"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>datagen analysis: {_esc(data['build']['source'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Correspondence study of <code>{_esc(data['build']['source'])}</code></h1>",
        f'<p>config fingerprint <code id="fingerprint">{_esc(fp)}</code>; '
        f"layers {_esc(data['layers'])} x steps {_esc(data['steps'])} "
        f"(timesteps {_esc(data['timesteps'])}); q/k stored for {_esc(data['feature_pairs'])}"
        + (
            f"; block-output features (matched by cosine, rows \"features\") stored for "
            f"{_esc(data['hidden_pairs'])}"
            if data.get("hidden_pairs")
            else ""
        )
        + ".</p>",
        "<h2>Summary</h2>",
        _summary(data),
        *[f'<p class="note">Note: {_esc(n)}.</p>' for n in data["notes"]],
        "<h2>What was used</h2>",
        f'<p id="counts">{c["videos_used"]} videos used, {c["videos_excluded"]} excluded; '
        f"{c['points_used']} frame-0 points, {c['pairs_scored']} (point, frame) pairs scored; "
        f"labels: {_esc(c['ground_truth'])}; points left out: {_esc(c['points_left_out'])}; "
        f"videos per group: {_esc(c['groups'])}.</p>",
        f"<p>Matching threshold {st['threshold_px']:.4g} px (the paper's "
        f"{st['threshold_px_at_480x720']:g} px at 480x720, scaled by the square root of the "
        f"pixel count); one token = {_esc(st['one_token_px'])} px (h, w). {_esc(st['units'])}."
        "</p>",
        _table("excluded", ["key", "reason"], data["excluded"])
        if data["excluded"]
        else '<p id="excluded">No video excluded.</p>',
    ]
    parts.append("<h2>Figures</h2>")
    for f in data["figures"]:
        src = _esc(f["file"])
        media = (
            f'<video src="{src}" controls muted loop width=512></video>'
            if f["file"].endswith(".mp4")
            else f'<img src="{src}" alt="{_esc(f["title"])}">'
        )
        parts.append(
            f"<figure>{media}<figcaption><b>{_esc(f['title'])}</b> {_esc(f['caption'])}"
            "</figcaption></figure>"
        )
    parts += [
        "<h2>Layer ranking</h2>",
        f"<p>Harmonic mean of min-max normalised {_esc(st['rank_by'])}, confidence and "
        "cross-frame attention (whole table), per cell; a layer's score is its cells' mean.</p>",
        _table("ranking-layers", ["rank", "layer", "score"], data["ranking"][GROUP_ALL]["layers"]),
        _table("ranking-cells", RANK_COLUMNS, data["ranking"][GROUP_ALL]["cells"]),
        "<h2>Matching, confidence and attention split</h2>",
        _table("matching", MATCH_COLUMNS, data["matching"]),
        "<h2>Zero-shot tracking (TAP-Vid, percent)</h2>",
        _table("tracking", TRACK_COLUMNS, data["tracking"]),
    ]
    parts += [
        "<h2>Build config</h2>",
        f'<pre id="config">{_esc(json.dumps(data["build"]["config"], indent=1, sort_keys=True))}'
        "</pre>",
        "<p>Tables: <a href=matching.csv>matching.csv</a>, <a href=ranking.csv>ranking.csv</a>, "
        "<a href=tracking.csv>tracking.csv</a>, <a href=report.json>report.json</a>.</p>",
        "</body></html>\n",
    ]
    return "\n".join(parts)


__all__ = ["write_report", "render_html", "clean"]
