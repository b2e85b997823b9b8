"""Trackers by name: ``make_tracker(name, **settings)``.

New trackers are added to ``TRACKER_FACTORIES`` (or through ``register_tracker``); the
factories import their module lazily so that heavy dependencies (torch models) load only when
that tracker is asked for. (This module, not :mod:`datagen.track.base`, holds the registry: the
tracker modules import the base types, so the base must not import them back.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datagen.track.base import Tracker


def _make_lk(**settings: Any) -> Tracker:
    from datagen.track.lk import LKTracker

    return LKTracker(**settings)


LK_RECOVER_DEFAULTS = {"win_size": 5, "recover": True, "fallback_neighbours": 3}
"""The ``lk_recover`` tracker: LK that follows lost points and re-acquires them (see
datagen.track.lk, "Recovery"); these settings scored best on the calibration set."""


def _make_lk_recover(**settings: Any) -> Tracker:
    from datagen.track.lk import LKTracker

    tracker = LKTracker(**{**LK_RECOVER_DEFAULTS, **settings})
    tracker.name = "lk_recover"
    return tracker


def _make_dis(**settings: Any) -> Tracker:
    from datagen.track.lk import DISTracker

    return DISTracker(**settings)


def _cotracker_factory(variant: str) -> Callable[..., Tracker]:
    def make(**settings: Any) -> Tracker:
        from datagen.track.cotracker import CoTrackerTracker

        settings.setdefault("variant", variant)
        if settings["variant"] != variant:
            raise ValueError(f"tracker {variant!r} got variant={settings['variant']!r}")
        return CoTrackerTracker(**settings)

    return make


# name -> factory(**settings) -> Tracker. Add new trackers here (e.g. "cotracker": a factory
# that imports the adapter module lazily), or call register_tracker from the adapter's module.
TRACKER_FACTORIES: dict[str, Callable[..., Tracker]] = {
    "lk": _make_lk,
    "lk_recover": _make_lk_recover,
    "dis": _make_dis,
    "cotracker3_offline": _cotracker_factory("cotracker3_offline"),
    "cotracker3_online": _cotracker_factory("cotracker3_online"),
}


def register_tracker(name: str, factory: Callable[..., Tracker]) -> None:
    """Add (or replace) a tracker factory under ``name``."""
    if not name or not isinstance(name, str):
        raise ValueError("tracker name must be a non-empty string")
    TRACKER_FACTORIES[name] = factory


def make_tracker(name: str, **settings: Any) -> Tracker:
    """Build the tracker called ``name`` with the given settings.

    Raises ``ValueError`` for an unknown name, an unknown setting or an invalid setting value.
    """
    factory = TRACKER_FACTORIES.get(name)
    if factory is None:
        choices = ", ".join(sorted(TRACKER_FACTORIES))
        raise ValueError(f"unknown tracker {name!r}; choose one of: {choices}")
    try:
        return factory(**settings)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"tracker {name!r}: {e}") from e
