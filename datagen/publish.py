"""`datagen publish REL --to URL`: copy a verified release to any fsspec location.

Each file goes up under a temporary name (``NAME.partial``) and is renamed into place;
``SHA256SUMS`` goes last, so a folder that has it is a whole release, and a reader never takes
a half-published one for complete. Re-running resumes: a file already at the target with the
right sha256 is skipped. After the upload every file at the target is read back and checked
against the sums. The Hugging Face Hub (``hf://datasets/ORG/NAME``): datagen.publish_hub.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from datagen.errors import UserError
from datagen.faults import failpoint
from datagen.verify import SUMS


def _sums(rel: Path) -> dict[str, str]:
    out = {}
    for line in (rel / SUMS).read_text().splitlines():
        digest, _, path = line.partition("  ")
        out[path] = digest
    return out


def _remote_sha(fs: Any, path: str) -> str | None:
    if not fs.exists(path):
        return None
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def publish(
    rel: Path,
    to: str,
    dry_run: bool = False,
    revision: str | None = None,
    private: bool = False,
    api: Any = None,
) -> dict[str, Any]:
    """Returns what was sent, skipped and checked. ``revision``, ``private``, ``api``: for
    the Hub only (datagen.publish_hub)."""
    import fsspec

    from datagen.verify import require_verified

    hub = to.startswith("hf://")
    if hub:
        from datagen.publish_hub import repo_of

        repo_of(to)
    elif revision is not None or private:
        raise UserError("--revision and --private are for hf:// targets only")
    require_verified(rel)
    if hub:
        from datagen.publish_hub import publish_hub

        return publish_hub(rel, to, revision=revision, private=private, dry_run=dry_run, api=api)
    try:
        fs, root = fsspec.core.url_to_fs(to)
    except (ImportError, ValueError) as exc:
        raise UserError(f"--to {to}: {exc}") from None
    root = root.rstrip("/")
    sums = _sums(rel)
    ours = (rel / SUMS).read_bytes()
    marker = f"{root}/{SUMS}"
    theirs = None
    if fs.exists(marker):
        with fs.open(marker, "rb") as f:
            theirs = f.read()
        if theirs != ours:
            raise UserError(
                f"--to {to} already holds another release; publish each version to its own folder"
            )
    send, skip = [], []
    for path, digest in sorted(sums.items()):
        (skip if _remote_sha(fs, f"{root}/{path}") == digest else send).append(path)
    last = [] if theirs == ours else [SUMS]  # the marker: sent last, when not already there
    if dry_run:
        return {"send": send + last, "skip": skip, "checked": 0}
    for i, path in enumerate(send):
        target = f"{root}/{path}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(rel / path), target + ".partial")
        fs.mv(target + ".partial", target)
        failpoint("publish-file", i)
    if last:
        fs.put_file(str(rel / SUMS), marker + ".partial")
        fs.mv(marker + ".partial", marker)
    bad = [p for p, d in sorted(sums.items()) if _remote_sha(fs, f"{root}/{p}") != d]
    if bad:
        raise UserError(f"--to {to}: {len(bad)} file(s) differ after upload, first {bad[0]}")
    return {"send": send + last, "skip": skip + ([] if last else [SUMS]), "checked": len(sums)}
