"""One pass over a build: the study's sums per group of videos, the zero-shot tracking scores,
and which videos and points were left out, and why.

Groups: every used video counts in ``all``, in ``category=C`` and in ``set=S`` (its prompt's
category and set, when it has them). Sums pool over points (:mod:`datagen.analysis.study`);
tracking scores are per video, averaged over videos as TAP-Vid does
(:func:`datagen.analysis.tapvid.evaluate_videos`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datagen.analysis import study as st
from datagen.analysis import zeroshot as zs
from datagen.layout import TokenLayout

GROUP_ALL = "all"
SOURCES = ("correspondence", "q/k")
"""Where attention numbers come from: the stored correspondence arrays, or q/k recomputed."""
ARGMAX, SOFT, REFINED = "attention argmax", "attention soft-argmax", "attention soft-argmax r"
PIXEL, NO_MOTION = "pixel patches", "no motion"
_FEATURE = re.compile(r"^(q|k)\.layer(\d+)\.step(\d+)$")
HIDDEN, COSINE = "features", "cosine argmax"
"""Source and tracker of matches by cosine similarity of stored block outputs (``h.*``)."""
_HIDDEN = re.compile(r"^h\.layer(\d+)\.step(\d+)$")


@dataclass(frozen=True)
class StudyOptions:
    reference_px: float = st.PAPER_THRESHOLD_PX
    """Matching threshold, pixels at 480x720 (scaled to the build's resolution)."""
    kept_only: bool = True
    """Only the tracks quality control kept (``qc_flags`` == 0)."""
    qk: bool = True
    """Also recompute matching and tracks from stored q/k (reads the features shards)."""
    radius: int = 1
    """Sub-token refinement window radius, tokens (soft-argmax from q/k)."""
    examples: int = 3
    """Videos kept by key for overlays and attention maps."""
    pseudo: bool = True
    """For videos labelled with exact tracks (``--source synthetic``), also label them with the
    build's configured tracker and score every zero-shot tracker against those pseudo labels
    too, as a text-to-video build of the same videos would be scored."""


TrackKey = tuple[str, str, int, int]
"""(method, source, layer, step); baselines use source "" and layer = step = -1."""


@dataclass
class Study:
    """What :func:`collect` gathers; the report derives every table and figure from it."""

    options: StudyOptions
    layers: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    layout: TokenLayout | None = None
    threshold_px: float = float("nan")
    corr: dict[str, np.ndarray] = field(default_factory=dict)
    """group -> (layers, steps, len(STATS)) sums from the stored correspondence."""
    qk: dict[str, dict[tuple[int, int], np.ndarray]] = field(default_factory=dict)
    """group -> (layer, step) -> sums of matches recomputed from q/k (matching fields only)."""
    baselines: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """group -> baseline name -> sums (matching fields only)."""
    tracking: dict[str, dict[TrackKey, list[dict[str, float]]]] = field(default_factory=dict)
    """group -> tracker -> one TAP-Vid metrics dict per video, against the build's labels."""
    tracking_pseudo: dict[str, dict[TrackKey, list[dict[str, float]]]] = field(
        default_factory=dict
    )
    """The same against pseudo labels of exact-labelled videos (``StudyOptions.pseudo``)."""
    pseudo_tracker: str | None = None
    """"pseudo (NAME)" of the tracker that made those labels."""
    pseudo_note: str | None = None
    """Why no pseudo labels were made, when the tracker could not be built."""
    videos: list[dict[str, Any]] = field(default_factory=list)
    """Used videos: key, category, set, points, pairs, ground truth."""
    excluded: list[dict[str, str]] = field(default_factory=list)
    """Videos left out: key and reason."""
    points_left_out: dict[str, int] = field(default_factory=dict)
    """Frame-0 points of used videos left out, by reason."""
    feature_pairs: list[tuple[int, int]] = field(default_factory=list)
    """(layer, step) pairs whose q/k were read."""
    hidden: dict[str, dict[tuple[int, int], np.ndarray]] = field(default_factory=dict)
    """group -> (layer, step) -> sums of matches by cosine similarity of stored block outputs
    (matching fields only; no reverse accuracy)."""
    hidden_pairs: list[tuple[int, int]] = field(default_factory=list)
    """(layer, step) pairs whose block outputs were read."""

    @property
    def groups(self) -> list[str]:
        return [GROUP_ALL] + sorted(g for g in self.corr if g != GROUP_ALL)

    def timestep_of(self, step: int) -> int:
        return self.timesteps[self.steps.index(step)]


def groups_of(meta: dict[str, Any]) -> list[str]:
    prompt = meta.get("prompt") or {}
    out = [GROUP_ALL]
    for name in ("category", "set"):
        if prompt.get(name):
            out.append(f"{name}={prompt[name]}")
    return out


def ground_truth_kind(meta: dict[str, Any]) -> str:
    """ "exact" (a synthetic source's own tracks) or "pseudo (TRACKER)"."""
    name = (meta.get("tracker") or {}).get("name", "unknown")
    return "exact" if name == "ground-truth" else f"pseudo ({name})"


def _merge(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sums where each field is set (not NaN) in at most one of ``a``, ``b``."""
    return np.where(np.isnan(a), b, a)


def feature_pairs(features: dict[str, Any]) -> list[tuple[int, int]]:
    """(layer, step) pairs with both q and k among stored tensor names."""
    have: dict[tuple[int, int], set[str]] = {}
    for name in features:
        m = _FEATURE.match(name)
        if m:
            have.setdefault((int(m.group(2)), int(m.group(3))), set()).add(m.group(1))
    return sorted(p for p, kinds in have.items() if kinds == {"q", "k"})


def hidden_pairs(features: dict[str, Any]) -> list[tuple[int, int]]:
    """(layer, step) pairs with a stored block output (``h.layerLLL.stepSSS``)."""
    found = (_HIDDEN.match(name) for name in features)
    return sorted((int(m.group(1)), int(m.group(2))) for m in found if m)


def select_points(
    s: dict[str, Any], kept_only: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The rows of a sample's frame-0 queries (the correspondence arrays' rows, in order), which
    of them the study uses (visible on frame 0, and kept by quality control when
    ``kept_only``), and how many were left out for each reason."""
    from datagen.sample import QC_FLAG_BITS

    first = np.flatnonzero(np.asarray(s["queries"])[:, 0] == 0)
    use = np.asarray(s["visible"], bool)[first, 0]
    dropped = {"not visible on frame 0": int((~use).sum())}
    flags = s.get("qc_flags")
    if kept_only and flags is not None:
        ok = (np.asarray(flags)[first] & sum(QC_FLAG_BITS.values())) == 0
        dropped["rejected by quality control"] = int((use & ~ok).sum())
        use &= ok
    return first, use, dropped


class _Collector:
    def __init__(self, opts: StudyOptions):
        self.study = Study(options=opts)
        self._tracker: Any = None
        """The build's tracker for pseudo labels, made on the first exact-labelled video."""
        self._tracker_tried = False

    def exclude(self, key: str, reason: str) -> None:
        self.study.excluded.append({"key": key, "reason": reason})

    def left_out(self, reason: str, count: int) -> None:
        if count:
            self.study.points_left_out[reason] = self.study.points_left_out.get(reason, 0) + count

    def add_sums(self, groups: list[str], sums: np.ndarray) -> None:
        for g in groups:
            if g in self.study.corr:
                self.study.corr[g] = self.study.corr[g] + sums
            else:
                self.study.corr[g] = sums.copy()

    def add_keyed(self, table: dict, groups: list[str], key: Any, sums: np.ndarray) -> None:
        for g in groups:
            cell = table.setdefault(g, {})
            cell[key] = cell[key] + sums if key in cell else sums.copy()

    def add_track(
        self, groups: list[str], key: TrackKey, metrics: dict[str, float], pseudo: bool = False
    ) -> None:
        table = self.study.tracking_pseudo if pseudo else self.study.tracking
        for g in groups:
            table.setdefault(g, {}).setdefault(key, []).append(metrics)

    def pseudo_labels(
        self, s: dict[str, Any], qxy: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The build's configured tracker run on the video from the same frame-0 queries, for
        a video whose labels are exact; None when not asked for, not applicable, or the
        tracker cannot be made here (why: ``Study.pseudo_note``)."""
        meta, frames = s["meta"], s.get("frames")
        if not self.study.options.pseudo or frames is None or ground_truth_kind(meta) != "exact":
            return None
        if not self._tracker_tried:
            self._tracker_tried = True
            cfg = ((meta.get("config") or {}).get("tracker")) or {}
            try:
                from datagen.track.registry import make_tracker

                self._tracker = make_tracker(cfg["name"], **(cfg.get("settings") or {}))
                self.study.pseudo_tracker = f"pseudo ({self._tracker.name})"
            except Exception as exc:  # unknown tracker, weights not available offline ...
                self.study.pseudo_note = f"tracker {cfg.get('name')}: {type(exc).__name__}: {exc}"
        if self._tracker is None:
            return None
        queries = np.concatenate([np.zeros((len(qxy), 1)), qxy], axis=1).astype(np.float32)
        res = self._tracker.track(np.asarray(frames), queries)
        return np.asarray(res.tracks, np.float64), np.asarray(res.visible, bool)

    def video(self, s: dict[str, Any]) -> None:
        study, opts = self.study, self.study.options
        meta, key = s["meta"], s["key"]
        corr = s.get("correspondence")
        if "layout" not in meta or "capture" not in meta:
            return self.exclude(key, "no token layout or capture metadata (built without capture)")
        if not corr or "match_forward" not in corr:
            return self.exclude(key, "no correspondence arrays (capture.corr_layers is empty)")
        layout = TokenLayout.from_json(meta["layout"])
        cap = meta["capture"]
        layers, steps = list(cap["corr_layers"]), list(cap["corr_steps"])
        timesteps = [int(cap["step_timesteps"][str(x)]) for x in steps]
        if study.layout is None:
            study.layout, study.layers, study.steps = layout, layers, steps
            study.timesteps = timesteps
            study.threshold_px = st.threshold_px(layout, opts.reference_px)
        elif (layout, layers, steps) != (study.layout, study.layers, study.steps):
            return self.exclude(key, "token layout or captured layers/steps differ from the first")
        first, use, dropped = select_points(s, opts.kept_only)
        if not first.size:
            return self.exclude(key, "no query point on frame 0")
        for reason, count in dropped.items():
            self.left_out(reason, count)
        if not use.any():
            return self.exclude(key, "no frame-0 point left (not visible or QC-rejected)")
        queries = np.asarray(s["queries"])
        rows = first[use]
        tracks = np.asarray(s["tracks"], np.float64)[rows]
        visible = np.asarray(s["visible"], bool)[rows]
        qxy = queries[rows, 1:].astype(np.float64)
        pairs = st.scored_pairs(tracks, visible, layout)
        groups = groups_of(meta)
        thr = study.threshold_px
        study.videos.append(
            {
                "key": key,
                "groups": groups,
                "points": int(rows.size),
                "pairs": int(pairs.point.size),
                "ground_truth": ground_truth_kind(meta),
            }
        )

        pseudo = self.pseudo_labels(s, qxy)

        def score(method: str, source: str, layer: int, step: int, pred, vis) -> None:
            m = zs.score_tracks(pred, vis, tracks, visible, layout)
            self.add_track(groups, (method, source, layer, step), m)
            if pseudo is not None:
                m = zs.score_tracks(pred, vis, pseudo[0], pseudo[1], layout)
                self.add_track(groups, (method, source, layer, step), m, pseudo=True)

        sums = np.zeros((len(layers), len(steps), len(st.STATS)))
        for li, layer in enumerate(layers):
            for si, step in enumerate(steps):
                mf = np.asarray(corr["match_forward"][li, si])[use]
                mr = np.asarray(corr["match_reverse"][li, si])
                sums[li, si] = _merge(
                    st.match_sums(mf, pairs, layout, thr, mr, qxy),
                    st.attention_sums(
                        np.asarray(corr["confidence"][li, si])[use],
                        np.asarray(corr["mass_text"][li, si])[use],
                        np.asarray(corr["mass_own_frame"][li, si])[use],
                        np.asarray(corr["mass_other_frames"][li, si])[use],
                        pairs,
                    ),
                )
                vis = zs.cycle_visible(zs.reverse_of_forward(mf, mr), qxy, layout)
                score(ARGMAX, SOURCES[0], layer, step, zs.tracks_from_tokens(mf, qxy, layout), vis)
                soft = np.asarray(corr["soft_forward"][li, si])[use]
                score(
                    SOFT,
                    SOURCES[0],
                    layer,
                    step,
                    zs.tracks_from_token_units(soft, qxy, layout),
                    vis,
                )
        self.add_sums(groups, sums)

        qtok = layout.token_index_of_pixel(qxy)
        feats = s.get("features") or {}
        for layer, step in feature_pairs(feats):
            if (layer, step) not in study.feature_pairs:
                study.feature_pairs.append((layer, step))
            uniq, inv = np.unique(qtok, return_inverse=True)
            m = zs.qk_matches(
                feats[f"q.layer{layer:03d}.step{step:03d}"],
                feats[f"k.layer{layer:03d}.step{step:03d}"],
                uniq,
                layout.token_grid[1:],
                radius=opts.radius,
            )
            match, refined, reverse = m.match[inv], m.refined[inv], m.reverse[inv]
            self.add_keyed(
                study.qk, groups, (layer, step), st.match_sums(match, pairs, layout, thr)
            )
            vis = zs.cycle_visible(reverse, qxy, layout)
            score(ARGMAX, SOURCES[1], layer, step, zs.tracks_from_tokens(match, qxy, layout), vis)
            score(
                REFINED,
                SOURCES[1],
                layer,
                step,
                zs.tracks_from_token_units(refined, qxy, layout),
                vis,
            )

        self.hidden_features(feats, qxy, pairs, groups, score)

        all_visible = np.ones((rows.size, len(zs.anchors(layout))), bool)
        still = np.repeat(qtok[:, None], layout.token_grid[0], axis=1)
        self.add_keyed(study.baselines, groups, NO_MOTION, st.match_sums(still, pairs, layout, thr))
        score(NO_MOTION, "", -1, -1, zs.no_motion_tracks(qxy, layout), all_visible)
        frames = s.get("frames")
        if frames is not None:
            pm = zs.pixel_patch_matches(np.asarray(frames), qxy, layout)
            self.add_keyed(study.baselines, groups, PIXEL, st.match_sums(pm, pairs, layout, thr))
            score(PIXEL, "", -1, -1, zs.tracks_from_tokens(pm, qxy, layout), all_visible)


    def hidden_features(self, feats: dict[str, Any], qxy, pairs, groups, score) -> None:
        """Matching sums and argmax tracks of one video from its stored block outputs, by
        cosine similarity (:func:`datagen.analysis.zeroshot.feature_matches`)."""
        study = self.study
        layout = study.layout
        assert layout is not None
        uniq, inv = np.unique(layout.token_index_of_pixel(qxy), return_inverse=True)
        for layer, step in hidden_pairs(feats):
            if (layer, step) not in study.hidden_pairs:
                study.hidden_pairs.append((layer, step))
            m = zs.feature_matches(feats[f"h.layer{layer:03d}.step{step:03d}"], uniq)
            match, reverse = m.match[inv], m.reverse[inv]
            sums = st.match_sums(match, pairs, layout, study.threshold_px)
            self.add_keyed(study.hidden, groups, (layer, step), sums)
            vis = zs.cycle_visible(reverse, qxy, layout)
            score(COSINE, HIDDEN, layer, step, zs.tracks_from_tokens(match, qxy, layout), vis)


def collect(source: Any, options: StudyOptions | None = None) -> tuple[Study, dict[str, Any]]:
    """Read every sample of a build once; return the :class:`Study` and the build's manifest.

    Raises ValueError when no sample carries correspondence arrays and a layout.
    """
    from datagen.data import open_dataset

    opts = options or StudyOptions()
    fields = ["tracks", "visible", "queries", "correspondence", "meta", "qc_flags"]
    ds = open_dataset(source, video=True, fields=fields, features=opts.qk)
    col = _Collector(opts)
    for s in ds:
        col.video(s)
    if not col.study.videos:
        reasons = sorted({e["reason"] for e in col.study.excluded}) or ["the build has no samples"]
        raise ValueError(f"{source}: no sample to analyse ({'; '.join(reasons)})")
    return col.study, dict(ds.manifest or {})
