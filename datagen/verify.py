"""`datagen verify PATH`: a release folder (SHA256SUMS, card, data/) or a build folder.

A release: every file against SHA256SUMS (changed, missing, unlisted), the card's YAML front
matter (parses; its counts and fingerprint equal the manifest's), croissant.json (every shard
described with the manifest's sha256 and size, nothing more), then the data folder as
`datagen validate` checks it (every shard's sha256 and index, every sample against the schema,
core/features key alignment, stats markers). A build folder: `validate`. ``quick``: checksums
and counts only (no sample decoded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datagen.card import CARD
from datagen.croissant import CROISSANT, check_croissant
from datagen.errors import UserError
from datagen.sampleformat import json_value
from datagen.shards import MANIFEST, sha256_file

SUMS = "SHA256SUMS"


def write_sums(folder: Path) -> None:
    """SHA256SUMS of every other file in ``folder`` ("<hex>  <path>", sorted)."""
    lines = [
        f"{sha256_file(p)}  {p.relative_to(folder).as_posix()}"
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != SUMS
    ]
    (folder / SUMS).write_text("\n".join(lines) + "\n")


def is_release(path: Path) -> bool:
    return (path / SUMS).is_file() and (path / "data" / MANIFEST).is_file()


def require_verified(rel: Path, what: str = "") -> None:
    """UserError unless ``rel`` is a release folder that verifies (``what``: the option that
    named it, for the message)."""
    name = f"{what} {rel}" if what else str(rel)
    if not is_release(rel):
        raise UserError(f"{name}: not a release folder (make one with datagen release)")
    problems, _ = verify(rel)
    if problems:
        raise UserError(
            f"{name} does not verify ({len(problems)} problems, first: {problems[0]}); "
            f"run datagen verify {rel}"
        )


def card_front(text: str) -> dict[str, Any]:
    """The card's YAML front matter (ValueError when there is none or it does not parse)."""
    import yaml

    if not text.startswith("---\n"):
        raise ValueError("no YAML front matter (the card must start with '---')")
    end = text.find("\n---\n", 4)
    if end < 0:
        raise ValueError("YAML front matter not closed with '---'")
    try:
        front = yaml.safe_load(text[4:end])
    except yaml.YAMLError as exc:
        raise ValueError(f"YAML does not parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(front, dict):
        raise ValueError("YAML front matter is not a mapping")
    return front


def check_sums(folder: Path, hashed: dict[str, str] | None = None) -> list[str]:
    """Problems with ``SHA256SUMS`` against the folder; ``hashed`` (when given) receives each
    listed file's computed sha256 by its path, so later checks need not read it again."""
    problems = []
    listed: dict[str, str] = {}
    for i, line in enumerate((folder / SUMS).read_text().splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in rel:
            problems.append(f"{SUMS}:{i}: not '<sha256>  <path>'")
            continue
        listed[rel] = digest
    for rel, digest in sorted(listed.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: listed in {SUMS} but missing")
            continue
        actual = sha256_file(path)
        if hashed is not None:
            hashed[rel] = actual
        if actual != digest:
            problems.append(f"{rel}: sha256 differs from {SUMS} (changed after release)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != SUMS and rel not in listed:
            problems.append(f"{rel}: not listed in {SUMS} (added after release)")
    return problems


def check_card(folder: Path, manifest: dict[str, Any]) -> list[str]:
    try:
        front = card_front((folder / CARD).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{CARD}: {exc}"]
    ours = front.get("datagen") or {}
    core = [s for s in manifest["shards"] if s["kind"] == "core"]
    has_features = any(s["kind"] == "features" for s in manifest["shards"])
    want = {
        "samples": manifest["totals"]["samples"],
        "core_shards": len(core),
        "config_fingerprint": manifest["config_fingerprint"],
        "features": has_features,
    }
    problems = [
        f"{CARD}: datagen.{k} is {ours.get(k)!r}, data/{MANIFEST} says {v!r}"
        for k, v in want.items()
        if ours.get(k) != v
    ]
    names = {c.get("config_name") for c in front.get("configs") or [] if isinstance(c, dict)}
    if "core" not in names or (has_features and "features" not in names):
        problems.append(f"{CARD}: configs must list core{' and features' if has_features else ''}")
    return problems


def check_croissant_file(folder: Path, manifest: dict[str, Any]) -> list[str]:
    import json

    path = folder / CROISSANT
    if not path.is_file():
        return [f"{CROISSANT}: missing (every release describes its shards in Croissant)"]
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{CROISSANT}: not valid JSON ({exc})"]
    return check_croissant(doc, manifest)


def quick_data(
    data: Path, manifest: dict[str, Any], hashed: dict[str, str] | None = None
) -> list[str]:
    """Checksums and counts only: every shard's sha256 and size against the manifest, the
    core count against the totals. ``hashed``: sha256 already computed this run, by path
    relative to ``data``."""
    hashed = hashed or {}
    problems = []
    for s in manifest["shards"]:
        path = data / s["path"]
        if not path.is_file():
            problems.append(f"{s['path']}: listed in {MANIFEST} but missing")
        elif (
            path.stat().st_size != s["bytes"]
            or (hashed.get(s["path"]) or sha256_file(path)) != s["sha256"]
        ):
            problems.append(f"{s['path']}: sha256 or size differs from {MANIFEST}")
    counted = sum(s["samples"] for s in manifest["shards"] if s["kind"] == "core")
    if counted != manifest["totals"]["samples"]:
        problems.append(f"{MANIFEST}: totals.samples {manifest['totals']['samples']}, shards hold "
                        f"{counted}")  # fmt: skip
    return problems


def verify(path: Path, quick: bool = False) -> tuple[list[str], str]:
    """Problems (one line each) and what was verified."""
    from datagen.validate import validate_dataset

    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a release folder or a build folder")
    if is_release(path):
        data = path / "data"
        hashed: dict[str, str] = {}
        problems = check_sums(path, hashed)
        try:
            manifest = json_value((data / MANIFEST).read_bytes())
        except ValueError as exc:
            return problems + [f"data/{MANIFEST}: {exc}"], "release"
        problems += check_card(path, manifest)
        problems += check_croissant_file(path, manifest)
        if quick:
            # Each shard was hashed once against SHA256SUMS; its digest serves the manifest too.
            in_data = {k[len("data/") :]: v for k, v in hashed.items() if k.startswith("data/")}
            problems += [f"data/{p}" for p in quick_data(data, manifest, in_data)]
        else:
            found, _ = validate_dataset(data)
            problems += [f"data/{p}" for p in found]
        return problems, "release"
    if not (path / MANIFEST).is_file():
        raise UserError(f"{path} holds neither a release ({SUMS}, data/) nor a build ({MANIFEST})")
    if quick:
        try:
            manifest = json_value((path / MANIFEST).read_bytes())
        except ValueError as exc:
            return [f"{MANIFEST}: {exc}"], "build"
        return quick_data(path, manifest), "build"
    return validate_dataset(path)[0], "build"
