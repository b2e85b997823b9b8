"""What a build tells its user: the closing summary, the quality-control warning and the note
on prompt words the model was not trained on. Pure functions of the manifest and the prompts,
so the CLI prints exactly what the data says."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

from datagen.prompts import Prompt
from datagen.shards import MANIFEST, QC_CAUSE_FIX, QC_CAUSE_TEXT

QC_WARN_SHARE = 0.5
"""A build whose QC rejects more than this share of the samples it checked ends with a warning."""


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.0f}%" if total else "n/a"


def qc_line(manifest: dict[str, Any]) -> str | None:
    """One line on the quality-control verdicts, or None when QC did not run."""
    qc = manifest.get("qc")
    if not qc:
        return None
    checked, accepted, rejected = qc["checked"], qc["accepted"], qc["rejected"]
    where = {
        "drop": "dropped, listed in manifest.json",
        "keep": "kept in the core shards, verdict in KEY.json",
        "separate": "written to rejected-NNNNNN.tar",
    }.get(qc.get("mode", "keep"), qc.get("mode", ""))
    line = (
        f"quality control: {checked} checked, {accepted} accepted ({_pct(accepted, checked)}), "
        f"{rejected} rejected ({_pct(rejected, checked)})"
    )
    if rejected:
        causes = ", ".join(f"{c['cause']} {c['samples']}" for c in qc["top_causes"][:3])
        line += f" [{where}]; main causes: {causes}"
    return line


def qc_warning(manifest: dict[str, Any]) -> str | None:
    """The warning a build ends with when QC rejected more than half of what it checked."""
    qc = manifest.get("qc")
    if not qc or not qc["checked"] or qc["rejected"] <= QC_WARN_SHARE * qc["checked"]:
        return None
    top = qc["top_causes"][0] if qc["top_causes"] else {"cause": "unknown", "samples": 0}
    cause = top["cause"]
    return (
        f"warning: quality control rejected {qc['rejected']} of {qc['checked']} samples "
        f"({_pct(qc['rejected'], qc['checked'])}); top reason: {cause} in {top['samples']} "
        f"({QC_CAUSE_TEXT.get(cause, cause)}); to change: "
        f"{QC_CAUSE_FIX.get(cause, 'look at the samples with datagen inspect --png')}"
    )


def summary_lines(manifest: dict[str, Any], out: Path, seconds: float, kept: int) -> list[str]:
    """The build's closing lines: counts that add up to the plan, QC verdicts, failures."""
    totals = manifest["totals"]
    samples = totals["samples"]
    failed = totals.get("failed", totals["rejected"])
    rate = samples / seconds if seconds else 0.0
    lines = [
        f"done: {samples} samples written in {totals['shards']} shards ({kept} kept from an "
        f"earlier run), {failed} failed, {human_bytes(totals['bytes'])}, {seconds:.1f} s "
        f"({rate:.1f} samples/s) -> {out}"
    ]
    q = qc_line(manifest)
    if q:
        lines.append(q)
    failures = [r for r in manifest["rejected"] if r["stage"] != "qc"]
    for r in failures[:10]:
        lines.append(f"  failed {r['key']} at {r['stage']}: {r['reason']}")
    if len(failures) > 10:
        lines.append(f"  ... {len(failures) - 10} more failures in {out / MANIFEST}")
    return lines


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


_FUNCTION_WORDS = frozenset(
    "a an the of on in at to from with and or into onto over under its his her their is are "
    "as by for while".split()
)


def unknown_words(prompts: list[Prompt], known: frozenset[str]) -> tuple[int, list[str]]:
    """How many prompts use words outside ``known`` (lower-cased), and those words, most
    frequent first (function words such as 'the' last: they make poor examples)."""
    counts: Counter[str] = Counter()
    affected = 0
    for p in prompts:
        words = {w.lower() for w in _WORD.findall(p.prompt)}
        new = words - known
        if new:
            affected += 1
            counts.update(new)
    ranked = sorted(counts.items(), key=lambda kv: (kv[0] in _FUNCTION_WORDS, -kv[1], kv[0]))
    return affected, [w for w, _ in ranked]


def vocabulary_note(prompts: list[Prompt], known: frozenset[str], model: str) -> str | None:
    """One line saying how many prompts the model cannot fully read (None when all can)."""
    affected, words = unknown_words(prompts, known)
    if not affected:
        return None
    examples = ", ".join(f"'{w}'" for w in words[:6])
    return (
        f"note: {affected} of {len(prompts)} prompts use words model {model} was not trained on "
        f"(e.g. {examples}; {len(words)} such words); it reads only "
        f"{', '.join(sorted(known))}. Unknown words still reach the text encoder but steer "
        "nothing the model learnt; see README 'The embedded model'"
    )
