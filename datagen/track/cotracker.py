"""CoTracker3 (Karaev et al., 2024) through ``torch.hub``, keeping the model's confidence.

Two trackers, registered as ``cotracker3_offline`` and ``cotracker3_online``: the hub entries of
the same names in ``facebookresearch/co-tracker``. The hub entry returns the authors' predictor
(``CoTrackerPredictor`` / ``CoTrackerOnlinePredictor``); we keep only its ``.model`` (the
underlying network) and call that the way the predictor does, because the predictor thresholds
visibility and throws the confidence away. What we do, step by step:

* Video: frames go to the model as float 0..255, resized to the model resolution
  (Hm, Wm) = (384, 512) with ``F.interpolate(..., mode="bilinear", align_corners=True)``, as in
  the predictor. Offline: the whole clip is resized once and handed to one call. Online: each
  window is resized on its own (memory bounded by the window, not by the video length).
* Coordinates: CoTracker works in pixel-centre indices (0 = centre of the first pixel) and maps
  video <-> model with the ``align_corners=True`` scale ``(Wm - 1) / (W - 1)`` (x) and
  ``(Hm - 1) / (H - 1)`` (y). We convert at the boundary: ``x_model = (x - 0.5) * (Wm-1)/(W-1)``
  on the way in, ``x = x_model * (W-1)/(Wm-1) + 0.5`` on the way out (same for y).
* Support grid: like the predictor, every model call gets a ``support_grid_size`` x
  ``support_grid_size`` grid of extra queries (CoTracker's ``get_points_on_a_grid`` at model
  resolution, margin Wm/64) at the first frame of the clip; CoTracker tracks points jointly and
  these give it context. They are dropped from the output. 0 disables them.
* Query frames: a query at frame t_q is tracked forward on frames t_q..T-1 and backward on the
  time-reversed frames t_q..0 (as the predictor's ``backward_tracking=True``: run the model on
  the flipped video and take its output for the frames before the query). Differences from the
  predictor, to save work and keep the support grid useful: each pass runs on the trimmed clip
  it needs (forward: from the earliest query frame of the call to the end; backward: from the
  latest query frame of the call back to frame 0), and the support grid sits at the clip's
  first frame (the predictor puts it at frame 0 of the forward video, i.e. the LAST frame of
  the reversed one). Queries at the last frame skip the forward pass, queries at frame 0 the
  backward pass. At its own frame a query is returned exactly as given, visible, with
  confidence 1 (the predictor overwrites the query frame the same way; see co-tracker#28).
* Visibility: ``visible = vis * conf > visibility_threshold`` with the model's visibility and
  confidence probabilities. Default 0.6: the rule behind CoTracker3's published TAP-Vid numbers
  (``EvaluationPredictor`` multiplies the two, the evaluator thresholds at 0.6) and the rule of
  the hub's online predictor. (The hub's OFFLINE predictor instead uses ``vis > 0.9`` and
  ignores the confidence.) Raise the threshold for fewer, more reliable visible labels.
* Confidence: the model's confidence head, sigmoid, kept as is: trained as the probability
  that the predicted position is within 12 px of the truth at MODEL resolution (384x512), i.e.
  within 12 * (W - 1) / 511 px horizontally in the video. It is reported for every frame,
  including frames where the point is predicted occluded.

Memory and long videos:

* Points: at most ``max_points_per_call`` queries (plus the support grid) go to one model call;
  more are split into consecutive groups, each its own call (the predictor's dense mode splits
  points the same way). Tracking memory grows with frames x points: per correlation level the
  model builds transient tensors of about 25 kB (correlation features) + 10 kB (correlation
  volume) per frame x point, i.e. ~1.3 GB for 49 frames x 1024 points. Points in one call are
  tracked jointly (attention across tracks), so the grouping can change results slightly.
* Frames, online variant: windowed exactly as the hub's online predictor (window 16 frames,
  step 8); video memory is one window; the model keeps only O(T x N) small state.
* Frames, offline variant: the whole clip is one call, with no chunking in time. Chunking an
  offline model in time would mean re-querying each chunk from the previous chunk's output,
  which loses points that are occluded at a chunk boundary and adds drift; that is what the
  online variant does properly, so use ``cotracker3_online`` for long videos. Resident memory
  per frame: ~2.4 MB resized video + ~8.4 MB feature pyramid (fp32), i.e. ~1.4 GB for 129
  frames (CoTracker runs its CNN in chunks of 200 frames). The offline model was trained on
  60-frame clips and stretches its time embedding to the clip length; quality on clips much
  longer than that is not something we have measured.

Loading (lazy: ``make_tracker`` is cheap; the model loads on the first ``track`` call, or on
``load()``, and is cached on the instance):

* ``repo``: a GitHub ``owner/name[:ref]`` (default ``facebookresearch/co-tracker``, fetched and
  cached by torch.hub under ``$TORCH_HOME/hub``; loaded with ``trust_repo=True``: naming a repo
  here is the trust decision) or a LOCAL directory holding a co-tracker checkout
  (``source="local"``, no network). Default from ``$DATAGEN_COTRACKER_REPO``.
* ``checkpoint``: a local ``.pth`` state dict, loaded with ``torch.load(weights_only=True)``
  into the model (the hub entry is then called with ``pretrained=False``); or a directory
  holding the authors' file names (``scaled_offline.pth`` / ``scaled_online.pth``). Default
  from ``$DATAGEN_COTRACKER_CHECKPOINT``. Without it, ``pretrained=True`` downloads the authors'
  weights through torch.hub (cached under ``$TORCH_HOME/hub/checkpoints``); ``pretrained=False``
  gives random weights (benchmarks and tests only).
* Offline machines: use a local checkout and a local checkpoint (settings or the two variables
  above); when the repo or the weights cannot be reached, ``UserError`` says so.
* Importing CoTracker's model modules calls ``torch.manual_seed(0)``; we load inside
  ``torch.random.fork_rng`` (seeded with 0, so random weights are reproducible) so that the
  caller's CPU random state is left untouched.

Everything runs in float32 (also on GPU). ``device="auto"`` picks CUDA when available.
"""

from __future__ import annotations

import http.client
import math
import os
import re
from typing import Any

import numpy as np

from datagen.errors import UserError
from datagen.track.base import TrackResult, check_frames, check_queries

__all__ = [
    "CoTrackerTracker",
    "VARIANTS",
    "DEFAULT_REPO",
    "ENV_REPO",
    "ENV_CHECKPOINT",
    "CHECKPOINT_FILES",
]

VARIANTS = ("cotracker3_offline", "cotracker3_online")
DEFAULT_REPO = "facebookresearch/co-tracker"
ENV_REPO = "DATAGEN_COTRACKER_REPO"
ENV_CHECKPOINT = "DATAGEN_COTRACKER_CHECKPOINT"
# the authors' checkpoint file per variant (what hubconf.py downloads for pretrained=True)
CHECKPOINT_FILES = {
    "cotracker3_offline": "scaled_offline.pth",
    "cotracker3_online": "scaled_online.pth",
}
_CHECKPOINT_URL = "https://huggingface.co/facebook/cotracker3/resolve/main/{}"
_GITHUB_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(:[A-Za-z0-9_./-]+)?")
_RESIZE_CHUNK = 16  # frames resized per F.interpolate call (bounds the float copy of the input)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_path_setting(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be None or a non-empty string, got {value!r}")
    return value


def support_grid(size: int, height: int, width: int) -> np.ndarray:
    """CoTracker's ``get_points_on_a_grid(size, (height, width))``: float64 (size**2, 2) (x, y).

    Pixel-centre coordinates at model resolution, margin ``width / 64`` on both axes, row-major.
    """
    if size == 0:
        return np.zeros((0, 2))
    if size == 1:
        return np.array([[width / 2.0, height / 2.0]])
    margin = width / 64.0
    xs = np.linspace(margin, width - margin, size)
    ys = np.linspace(margin, height - margin, size)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


class CoTrackerTracker:
    """CoTracker3 point tracker (see the module docstring for what is done and why).

    Args:
        variant: "cotracker3_offline" (whole clip at once, better) or "cotracker3_online"
            (sliding 16-frame windows, memory independent of the video length).
        repo: GitHub ``owner/name[:ref]`` or a local co-tracker checkout; None:
            ``$DATAGEN_COTRACKER_REPO``, else "facebookresearch/co-tracker".
        checkpoint: local ``.pth`` file (or a directory with ``scaled_offline.pth`` /
            ``scaled_online.pth``) loaded weights-only into the model; None:
            ``$DATAGEN_COTRACKER_CHECKPOINT``, else the hub's weights when ``pretrained``.
        pretrained: without a checkpoint, whether the hub entry downloads the authors' weights
            (False: random weights, for tests and benchmarks).
        device: "auto" (CUDA if available, else CPU) or a torch device string.
        visibility_threshold: a point is visible where ``vis * conf`` exceeds it, in [0, 1].
        support_grid_size: side of the support grid added to every call (0: none).
        iters: refinement iterations of the model (the predictor uses 6).
        max_points_per_call: queries per model call; larger query sets are split.

    ``settings()`` returns these keywords with ``repo`` and ``checkpoint`` resolved (the
    environment is read once, at construction).
    """

    def __init__(
        self,
        variant: str = "cotracker3_offline",
        repo: str | None = None,
        checkpoint: str | None = None,
        pretrained: bool = True,
        device: str = "auto",
        visibility_threshold: float = 0.6,
        support_grid_size: int = 6,
        iters: int = 6,
        max_points_per_call: int = 1024,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
        self.variant = variant
        self.name = variant
        repo = _check_path_setting("repo", repo)
        if repo is None:
            repo = os.environ.get(ENV_REPO) or DEFAULT_REPO
        self.repo = repo
        checkpoint = _check_path_setting("checkpoint", checkpoint)
        if checkpoint is None:
            checkpoint = os.environ.get(ENV_CHECKPOINT) or None
        self.checkpoint = checkpoint
        if not isinstance(pretrained, bool):
            raise ValueError(f"pretrained must be true or false, got {pretrained!r}")
        self.pretrained = pretrained
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be 'auto' or a torch device string, got {device!r}")
        if device != "auto":
            import torch

            try:
                torch.device(device)
            except (RuntimeError, ValueError) as e:
                raise ValueError(f"device {device!r} is not a valid torch device: {e}") from e
        self.device = device
        ok = isinstance(visibility_threshold, (int, float, np.number)) and not isinstance(
            visibility_threshold, bool
        )
        if not ok or not math.isfinite(visibility_threshold) or not 0 <= visibility_threshold <= 1:
            raise ValueError(
                f"visibility_threshold must be a number within [0, 1], got {visibility_threshold!r}"
            )
        self.visibility_threshold = float(visibility_threshold)
        self.support_grid_size = _check_int("support_grid_size", support_grid_size, 0)
        self.iters = _check_int("iters", iters, 1)
        self.max_points_per_call = _check_int("max_points_per_call", max_points_per_call, 1)
        self._model: Any = None  # the underlying network, once loaded
        self._interp_shape: tuple[int, int] = (384, 512)
        self._torch_device: Any = None

    def settings(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "repo": self.repo,
            "checkpoint": self.checkpoint,
            "pretrained": self.pretrained,
            "device": self.device,
            "visibility_threshold": self.visibility_threshold,
            "support_grid_size": self.support_grid_size,
            "iters": self.iters,
            "max_points_per_call": self.max_points_per_call,
        }

    # --- loading -------------------------------------------------------------------------

    def _offline_hint(self) -> str:
        ckpt = CHECKPOINT_FILES[self.variant]
        return (
            f"to work offline set tracker settings repo=/path/to/co-tracker (a checkout of "
            f"github.com/{DEFAULT_REPO}) and checkpoint=/path/to/{ckpt} "
            f"({_CHECKPOINT_URL.format(ckpt)}), or the environment variables {ENV_REPO} and "
            f"{ENV_CHECKPOINT}"
        )

    def _resolve_repo(self) -> tuple[str, str]:
        """-> (repo_or_dir, source) for torch.hub.load."""
        path = os.path.expanduser(self.repo)
        if os.path.isdir(path):
            if not os.path.isfile(os.path.join(path, "hubconf.py")):
                raise UserError(
                    f"tracker setting repo={self.repo!r}: the directory has no hubconf.py; "
                    f"give the root of a co-tracker checkout (github.com/{DEFAULT_REPO})"
                )
            return path, "local"
        looks_like_path = self.repo.startswith(("/", ".", "~"))
        if looks_like_path or not _GITHUB_RE.fullmatch(self.repo):
            raise UserError(
                f"tracker setting repo={self.repo!r}: no such directory, and not a GitHub "
                f"owner/name[:ref]; {self._offline_hint()}"
            )
        return self.repo, "github"

    def load(self) -> None:
        """Load the model now (idempotent); ``track`` calls it. Raises ``UserError`` when the
        repository, the weights or the checkpoint cannot be used."""
        if self._model is not None:
            return
        import torch

        repo_or_dir, source = self._resolve_repo()
        ckpt_path = self._checkpoint_path()
        where = repo_or_dir if source == "local" else f"github.com/{repo_or_dir}"
        kwargs: dict[str, Any] = {"pretrained": self.pretrained and ckpt_path is None}
        if source == "github":
            kwargs.update(trust_repo=True, verbose=False)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                obj = torch.hub.load(repo_or_dir, self.variant, source=source, **kwargs)
        except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
            raise UserError(
                f"cannot load CoTracker {self.variant} from {where} ({_one_line(e)}); "
                f"{self._offline_hint()}"
            ) from e
        except RuntimeError as e:
            msg = str(e)
            if "internet" in msg or isinstance(e.__cause__, OSError):
                raise UserError(
                    f"cannot reach CoTracker {self.variant} at {where} ({_one_line(e)}); "
                    f"{self._offline_hint()}"
                ) from e
            if "Cannot find callable" in msg:
                raise UserError(
                    f"tracker setting repo={self.repo!r}: its hubconf.py has no entry "
                    f"{self.variant!r}; use a current checkout of github.com/{DEFAULT_REPO}"
                ) from e
            raise

        model = getattr(obj, "model", obj)
        if not isinstance(model, torch.nn.Module):
            raise UserError(
                f"tracker setting repo={self.repo!r}: hub entry {self.variant!r} returned "
                f"{type(obj).__name__}, not a CoTracker predictor; use a checkout of "
                f"github.com/{DEFAULT_REPO}"
            )
        online = self.variant == "cotracker3_online"
        if online and not hasattr(model, "init_video_online_processing"):
            raise UserError(
                f"tracker setting repo={self.repo!r}: {self.variant!r} returned a model without "
                f"online processing; use a current checkout of github.com/{DEFAULT_REPO}"
            )
        if ckpt_path is not None:
            self._load_checkpoint(model, ckpt_path)
        shape = getattr(obj, "interp_shape", None) or getattr(model, "model_resolution", None)
        self._interp_shape = (int(shape[0]), int(shape[1])) if shape else (384, 512)

        dev = self.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self._torch_device = torch.device(dev)
        model = model.float().to(self._torch_device).eval()
        model.requires_grad_(False)
        self._model = model

    def _checkpoint_path(self) -> str | None:
        if self.checkpoint is None:
            return None
        path = os.path.expanduser(self.checkpoint)
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_FILES[self.variant])
        if not os.path.isfile(path):
            raise UserError(
                f"tracker setting checkpoint={self.checkpoint!r}: file not found: {path}; "
                f"give the path of {CHECKPOINT_FILES[self.variant]} "
                f"({_CHECKPOINT_URL.format(CHECKPOINT_FILES[self.variant])})"
            )
        return path

    def _load_checkpoint(self, model: Any, path: str) -> None:
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors have no common base class
            raise UserError(
                f"tracker setting checkpoint: {path} is not a readable weights-only PyTorch "
                f"checkpoint ({_one_line(e)}); give CoTracker's {CHECKPOINT_FILES[self.variant]}"
            ) from e
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # training checkpoints wrap the weights (as build_cotracker)
        if not isinstance(state, dict):
            raise UserError(
                f"tracker setting checkpoint: {path} holds {type(state).__name__}, not a state "
                f"dict; give CoTracker's {CHECKPOINT_FILES[self.variant]}"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(
                f"tracker setting checkpoint: {path} does not fit {self.variant} "
                f"({_one_line(e)}); this variant needs {CHECKPOINT_FILES[self.variant]}"
            ) from e

    # --- tracking ------------------------------------------------------------------------

    def track(self, frames: np.ndarray, queries: np.ndarray) -> TrackResult:
        frames = check_frames(frames)
        num_frames, height, width = frames.shape[:3]
        q = check_queries(queries, num_frames, height, width)
        n = q.shape[0]
        tracks = np.zeros((n, num_frames, 2), np.float64)  # model coordinates until the end
        vis = np.zeros((n, num_frames), np.float32)
        conf = np.zeros((n, num_frames), np.float32)
        if n == 0:
            empty = TrackResult(tracks.astype(np.float32), vis > 0, conf)
            return empty.validate(0, num_frames)

        tq = q[:, 0].astype(np.int64)
        hm, wm = self._interp_shape
        if num_frames > 1:
            self.load()
            hm, wm = self._interp_shape
            sx_in = (wm - 1) / (width - 1) if width > 1 else 0.0
            sy_in = (hm - 1) / (height - 1) if height > 1 else 0.0
            xy_m = (q[:, 1:3].astype(np.float64) - 0.5) * np.array([sx_in, sy_in])
            self._track_model(frames, tq, xy_m, tracks, vis, conf)
        # model -> raster coordinates
        scale_out = np.array([(width - 1) / (wm - 1), (height - 1) / (hm - 1)])
        tracks = tracks * scale_out + 0.5
        visible = vis * conf > self.visibility_threshold
        # the query frame: exactly the query, visible, confidence 1
        rows = np.arange(n)
        tracks[rows, tq] = q[:, 1:3]
        visible[rows, tq] = True
        conf[rows, tq] = 1.0
        result = TrackResult(tracks.astype(np.float32), visible, np.clip(conf, 0.0, 1.0))
        return result.validate(n, num_frames)

    def _track_model(self, frames, tq, xy_m, tracks, vis, conf) -> None:
        """Fill tracks (model coords), vis and conf for all frames but the query frames."""
        import torch

        num_frames = frames.shape[0]
        online = self.variant == "cotracker3_online"
        with torch.inference_mode():
            video = None if online else self._resize(frames)  # (T, 3, Hm, Wm) on the device
            for forward in (True, False):
                sel = np.flatnonzero(tq < num_frames - 1) if forward else np.flatnonzero(tq > 0)
                for s in range(0, sel.size, self.max_points_per_call):
                    idx = sel[s : s + self.max_points_per_call]
                    if forward:
                        t0 = int(tq[idx].min())
                        clip_frames = np.arange(t0, num_frames)
                        clip_tq = tq[idx] - t0
                    else:
                        t1 = int(tq[idx].max())
                        clip_frames = np.arange(t1, -1, -1)
                        clip_tq = t1 - tq[idx]
                    if online:
                        out = self._run_online(frames, clip_frames, clip_tq, xy_m[idx])
                    else:
                        clip = video[t0:] if forward else video[: t1 + 1].flip(0)
                        out = self._run_offline(clip, clip_tq, xy_m[idx])
                    c_xy, c_vis, c_conf = out  # (Nc, Tc, 2), (Nc, Tc), (Nc, Tc)
                    if forward:
                        keep = clip_frames[None, :] >= tq[idx, None]
                    else:
                        keep = clip_frames[None, :] < tq[idx, None]
                    r, c = np.nonzero(keep)
                    rows, cols = idx[r], clip_frames[c]
                    tracks[rows, cols] = c_xy[r, c]
                    vis[rows, cols] = c_vis[r, c]
                    conf[rows, cols] = c_conf[r, c]

    def _resize(self, frames: np.ndarray) -> Any:
        """uint8 (T, H, W, 3) -> float32 (T, 3, Hm, Wm) on the device, values 0..255."""
        import torch
        import torch.nn.functional as F

        hm, wm = self._interp_shape
        out = torch.empty(
            (frames.shape[0], 3, hm, wm), dtype=torch.float32, device=self._torch_device
        )
        for s in range(0, frames.shape[0], _RESIZE_CHUNK):
            part = torch.from_numpy(np.ascontiguousarray(frames[s : s + _RESIZE_CHUNK]))
            part = part.to(self._torch_device).permute(0, 3, 1, 2).float()
            out[s : s + part.shape[0]] = F.interpolate(
                part, (hm, wm), mode="bilinear", align_corners=True
            )
        return out

    def _queries(self, clip_tq: np.ndarray, xy_m: np.ndarray) -> Any:
        """(1, Nc + G, 3) float32 model queries (t, x, y): ours, then the support grid at 0."""
        import torch

        hm, wm = self._interp_shape
        grid = support_grid(self.support_grid_size, hm, wm)
        qs = np.zeros((len(clip_tq) + len(grid), 3), np.float64)
        qs[: len(clip_tq), 0] = clip_tq
        qs[: len(clip_tq), 1:] = xy_m
        qs[len(clip_tq) :, 1:] = grid
        return torch.from_numpy(qs.astype(np.float32))[None].to(self._torch_device)

    def _outputs(self, out: Any, num_queries: int, num_frames: int):
        """Model outputs (coords, vis, conf, ...) -> numpy (Nc, Tc, 2), (Nc, Tc), (Nc, Tc)."""
        if not isinstance(out, (tuple, list)) or len(out) < 3 or out[2] is None:
            raise RuntimeError(
                f"CoTracker {self.variant} returned no confidence; is repo={self.repo!r} a "
                f"CoTracker3 checkout? (expected coords, visibility, confidence, ...)"
            )
        coords, v, c = out[0], out[1], out[2]
        expect = (1, num_frames)
        if tuple(coords.shape[:2]) != expect or tuple(v.shape[:2]) != expect:
            raise RuntimeError(
                f"CoTracker {self.variant} returned tracks of shape {tuple(coords.shape)} for "
                f"{num_frames} frames"
            )
        coords = coords[0, :, :num_queries, :2].permute(1, 0, 2).double().cpu().numpy()
        v = v.reshape(1, num_frames, -1)[0, :, :num_queries].T.float().cpu().numpy()
        c = c.reshape(1, num_frames, -1)[0, :, :num_queries].T.float().cpu().numpy()
        return coords, v, c

    def _run_offline(self, clip: Any, clip_tq: np.ndarray, xy_m: np.ndarray):
        queries = self._queries(clip_tq, xy_m)
        out = self._model(video=clip[None], queries=queries, iters=self.iters)
        return self._outputs(out, len(clip_tq), clip.shape[0])

    def _run_online(self, frames, clip_frames, clip_tq, xy_m):
        """The hub online predictor's loop: windows of ``window_len`` frames, step half that."""
        model = self._model
        window = int(model.window_len)
        step = window // 2
        queries = self._queries(clip_tq, xy_m)
        num = len(clip_frames)
        model.init_video_online_processing()
        ind = 0
        while True:
            chunk = self._resize(frames[clip_frames[ind : ind + window]])
            out = model(video=chunk[None], queries=queries, iters=self.iters, is_online=True)
            if ind + window >= num:
                break
            ind += step
        return self._outputs(out, len(clip_tq), num)
