"""`datagen publish REL --to hf://datasets/ORG/NAME`: a verified release to the Hugging Face
Hub through huggingface_hub.

* The token comes from where huggingface_hub looks (``HF_TOKEN``, the HF config written by
  ``hf auth login``); ``--revision`` picks a branch (created when missing), ``--private`` makes
  a new repo private.
* Two commits, the data first and the card, ``croissant.json`` and ``SHA256SUMS`` last: until
  the final commit the repo has no card naming the new files (``datasets`` loads what the card
  lists), so a reader never takes a half-published release for the new one. ``upload_folder``
  skips files the Hub already holds with the same content and commits large folders in
  several parts, so re-running after a failure resumes.
* After the upload, ``verify_repo_checksums`` compares every file of the release with the
  Hub's sha256 (the digests in ``SHA256SUMS``).
* A repo (at that revision) that holds another release's ``SHA256SUMS`` is refused.
* ``--dry-run`` lists the two commits and contacts nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from datagen.card import CARD
from datagen.croissant import CROISSANT
from datagen.errors import UserError
from datagen.verify import SUMS

FINAL = [CARD, CROISSANT, SUMS]
HUB_URL = re.compile(r"^hf://datasets/([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)/?$")
REPO = "dataset"


def repo_of(url: str) -> str:
    m = HUB_URL.match(url)
    if m is None:
        raise UserError(
            f"--to {url}: give a Hub dataset as hf://datasets/ORG/NAME (models and spaces are "
            "not dataset repos)"
        )
    return m.group(1)


def _files(rel: Path) -> list[str]:
    return sorted(p.relative_to(rel).as_posix() for p in rel.rglob("*") if p.is_file())


def _hub_error(repo: str, exc: Exception) -> UserError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "token" in text.lower() or "401" in text or "403" in text:
        hint = "log in with `hf auth login` or set HF_TOKEN to a token that may write it"
    else:
        hint = "check the network and the repo name, then run the same command again (it resumes)"
    return UserError(f"hf://datasets/{repo}: {type(exc).__name__}: {text}; {hint}")


def publish_hub(
    rel: Path,
    url: str,
    revision: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    api: Any = None,
) -> dict[str, Any]:
    """Upload ``rel`` (already verified by the caller). ``api``: an ``HfApi``-like object
    (tests inject a recording fake: no Hub server runs offline)."""
    repo = repo_of(url)
    files = _files(rel)
    data = [f for f in files if f not in FINAL]
    if dry_run:
        return {"send": data + FINAL, "skip": [], "checked": 0, "commits": [data, FINAL]}
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    ours = (rel / SUMS).read_text()
    try:
        api.create_repo(repo, repo_type=REPO, private=private, exist_ok=True)
        if revision not in (None, "main"):
            api.create_branch(repo, branch=revision, repo_type=REPO, exist_ok=True)
        if SUMS in api.list_repo_files(repo, repo_type=REPO, revision=revision):
            theirs = Path(
                api.hf_hub_download(repo, SUMS, repo_type=REPO, revision=revision)
            ).read_text()
            if theirs != ours:
                raise UserError(
                    f"--to {url}{'@' + revision if revision else ''} already holds another "
                    "release; publish each version to its own repo or --revision"
                )
        name = rel.name
        api.upload_folder(
            repo_id=repo, folder_path=rel, repo_type=REPO, revision=revision,
            ignore_patterns=FINAL, commit_message=f"datagen release {name}: data",
        )  # fmt: skip
        api.upload_folder(
            repo_id=repo, folder_path=rel, repo_type=REPO, revision=revision,
            allow_patterns=FINAL, commit_message=f"datagen release {name}: card, checksums",
        )  # fmt: skip
        check = api.verify_repo_checksums(repo, repo_type=REPO, revision=revision, local_dir=rel)
    except UserError:
        raise
    except Exception as exc:  # huggingface_hub raises HTTP, token and network errors
        raise _hub_error(repo, exc) from None
    # huggingface_hub's words: mismatches differ, extra_paths are local only (not uploaded),
    # missing_paths are on the Hub only (.gitattributes, files of earlier commits)
    bad = [f"{m['path']} (sha256 {m['actual']} on the Hub)" for m in check.mismatches]
    bad += [f"{p} (not on the Hub)" for p in check.extra_paths]
    if bad:
        raise UserError(f"--to {url}: {len(bad)} file(s) differ after upload, first {bad[0]}; "
                        "run the same command again")  # fmt: skip
    others = [p for p in check.missing_paths if p != ".gitattributes"]
    return {"send": files, "skip": [], "checked": check.checked_count, "commits": [data, FINAL],
            "others": others}  # fmt: skip
