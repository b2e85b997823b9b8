"""The report's figures: charts from the report's own tables (so a figure shows exactly the
numbers of ``report.json``), track overlays and attention maps drawn over video frames.

matplotlib is imported lazily and used through ``Figure`` with the Agg canvas only (no pyplot,
no global backend switch); overlays are drawn with OpenCV like ``datagen inspect``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datagen.analysis.collect import GROUP_ALL, SOURCES


def _figure(w: float, h: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


def _grid(data: dict[str, Any], metric: str) -> np.ndarray:
    layers, steps = data["layers"], data["steps"]
    out = np.full((len(layers), len(steps)), np.nan)
    for r in data["matching"]:
        if r["group"] == GROUP_ALL and r["source"] == SOURCES[0] and r[metric] is not None:
            out[layers.index(r["layer"]), steps.index(r["step"])] = r[metric]
    return out


def _step_labels(data: dict[str, Any]) -> list[str]:
    return [f"{s}\n(t={t})" for s, t in zip(data["steps"], data["timesteps"], strict=True)]


def accuracy_heatmap(data: dict[str, Any], path: Path) -> Path:
    """Matching accuracy (pixel threshold and one token) over layers x steps."""
    fig = _figure(5 + 0.8 * len(data["steps"]), 1.8 + 0.3 * len(data["layers"]))
    thr = data["settings"]["threshold_px"]
    panels = [("accuracy_px", f"< {thr:.3g} px"), ("accuracy_token", "within one token")]
    for i, (metric, title) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        grid = _grid(data, metric)
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for (li, si), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(si, li, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(data["steps"])), _step_labels(data), fontsize=7)
        ax.set_yticks(range(len(data["layers"])), data["layers"], fontsize=7)
        ax.set_xlabel("denoising step")
        ax.set_ylabel("layer")
        ax.set_title(f"accuracy (%),\n{title}", fontsize=9)
    fig.colorbar(im, ax=fig.axes, shrink=0.8)
    return _save(fig, path)


def accuracy_vs_step(data: dict[str, Any], path: Path, top: int = 3) -> Path:
    """Accuracy against step for the best-ranked layers, with the baselines as lines."""
    fig = _figure(6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    grid = _grid(data, "accuracy_token")
    best = [r["layer"] for r in data["ranking"][GROUP_ALL]["layers"][:top]]
    x = np.arange(len(data["steps"]))
    for layer in best:
        ax.plot(x, grid[data["layers"].index(layer)], marker="o", label=f"layer {layer}")
    for r in data["matching"]:
        if (
            r["group"] == GROUP_ALL
            and r["source"] == "baseline"
            and r["accuracy_token"] is not None
        ):
            ax.axhline(r["accuracy_token"], ls="--", lw=1, color="grey")
            ax.text(x[-1], r["accuracy_token"], r["method"], fontsize=7, va="bottom", ha="right")
    ax.set_xticks(x, _step_labels(data), fontsize=7)
    ax.set_ylim(0, 100)
    ax.set_xlabel("denoising step (later = less noise)")
    ax.set_ylabel("accuracy within one token (%)")
    ax.set_title("matching accuracy of the best-ranked layers", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def confidence_and_split(data: dict[str, Any], path: Path) -> Path:
    """Confidence per layer (one line a step) and the attention split at the last step."""
    fig = _figure(9, 3.4)
    layers = data["layers"]
    x = np.arange(len(layers))
    ax = fig.add_subplot(1, 2, 1)
    conf = _grid(data, "confidence")
    for si, label in enumerate(_step_labels(data)):
        ax.plot(x, conf[:, si], marker=".", label="step " + label.replace("\n", " "))
    ax.set_xticks(x, layers, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("confidence (max prob. on frame f)")
    ax.set_title("confidence score", fontsize=9)
    ax.legend(fontsize=6)
    ax = fig.add_subplot(1, 2, 2)
    bottom = np.zeros(len(layers))
    for metric, label in (
        ("mass_text", "text"),
        ("mass_own_frame", "own frame"),
        ("mass_other_frames", "other frames"),
    ):
        v = np.nan_to_num(_grid(data, metric)[:, -1])
        ax.bar(x, v, bottom=bottom, label=label)
        bottom += v
    ax.set_xticks(x, layers, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass")
    ax.set_title(f"attention split at step {data['steps'][-1]}", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def ranking_chart(data: dict[str, Any], path: Path) -> Path:
    """Layers by harmonic-mean score, best first."""
    rank = data["ranking"][GROUP_ALL]["layers"]
    fig = _figure(max(4, 0.35 * len(rank) + 2), 3)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(rank)), [r["score"] or 0 for r in rank], color="tab:purple")
    ax.set_xticks(range(len(rank)), [str(r["layer"]) for r in rank], fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (best first)")
    ax.set_ylabel("harmonic mean")
    ax.set_title(
        f"layer ranking: harmonic mean of normalised {data['ranking'][GROUP_ALL]['rank_by']}, "
        "confidence, cross-frame attention",
        fontsize=8,
    )
    return _save(fig, path)


def _colour(i: int, n: int) -> tuple[int, int, int]:
    import cv2

    hsv = np.uint8([[[int(180 * i / max(n, 1)), 220, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(r), int(g), int(b)


def overlay_frames(
    frames: np.ndarray,
    gt: np.ndarray,
    gt_visible: np.ndarray,
    pred: np.ndarray,
    pred_visible: np.ndarray,
    scale: int,
) -> np.ndarray:
    """RGB frames (A, H*s, W*s, 3) upscaled by ``scale``: labels as hollow squares, predictions
    as dots joined to their label, one colour a point; ``frames`` (A, H, W, 3) are the anchor
    frames and every track (N, A, 2) is in raster pixels at them."""
    import cv2

    out = []
    n = gt.shape[0]
    for a, frame in enumerate(frames):
        img = np.ascontiguousarray(
            cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
        )
        for i in range(n):
            c = _colour(i, n)
            g = tuple(int(v) for v in np.round(gt[i, a] * scale))
            p = tuple(int(v) for v in np.round(pred[i, a] * scale))
            if gt_visible[i, a]:
                cv2.rectangle(img, (g[0] - 2, g[1] - 2), (g[0] + 2, g[1] + 2), c, 1)
                cv2.line(img, g, p, c, 1, cv2.LINE_AA)
            cv2.circle(img, p, 2, c, -1 if pred_visible[i, a] else 1, cv2.LINE_AA)
        out.append(img)
    return np.stack(out)


def track_strip(images: np.ndarray, labels: list[str], path: Path, max_panels: int = 6) -> Path:
    """A PNG of up to ``max_panels`` overlay frames side by side."""
    import cv2

    picks = np.unique(np.linspace(0, len(images) - 1, min(max_panels, len(images))).round())
    panels = []
    for i in picks.astype(int):
        img = images[i].copy()
        cv2.putText(img, labels[i], (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
        panels.append(img)
        panels.append(np.full((img.shape[0], 4, 3), 255, np.uint8))
    strip = np.concatenate(panels[:-1], axis=1)
    ok, buf = cv2.imencode(".png", strip[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())
    return path


def track_video(images: np.ndarray, path: Path, fps: int = 4) -> Path:
    """An H.264 MP4 of the overlay frames (even sizes, as yuv420p needs)."""
    from datagen.config import VideoConfig
    from datagen.video import encode_video

    h, w = images.shape[1] // 2 * 2, images.shape[2] // 2 * 2
    path.write_bytes(encode_video(np.ascontiguousarray(images[:, :h, :w]), fps, VideoConfig()))
    return path


def attention_figure(
    frames: np.ndarray,
    maps: np.ndarray,
    query_xy: np.ndarray,
    gt: np.ndarray,
    titles: list[str],
    title: str,
    path: Path,
) -> Path:
    """One query point's head-averaged attention over each anchor frame's tokens: frames
    (A, H, W, 3), maps (A, h, w) probabilities (each frame's softmax sums to 1), the query
    (2,) and its label (A, 2) in raster pixels."""
    a = len(frames)
    fig = _figure(1.6 * a + 0.6, 2.2)
    h, w = frames.shape[1:3]
    for i in range(a):
        ax = fig.add_subplot(1, a, i + 1)
        ax.imshow(frames[i], extent=(0, w, h, 0))
        ax.imshow(maps[i], extent=(0, w, h, 0), alpha=0.6, cmap="magma", interpolation="nearest")
        ax.plot(*gt[i], "s", mfc="none", mec="cyan", ms=6)
        if i == 0:
            ax.plot(*query_xy, "x", color="cyan", ms=6)
        ax.set_title(titles[i], fontsize=7)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=8)
    return _save(fig, path)
