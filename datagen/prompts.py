"""The prompt bank: read .txt / .jsonl / .csv files (or a folder of them) into stable prompts.

Ids are stable: given explicitly, or derived from the prompt text (never from the line
position), so editing the bank does not shift the keys of untouched prompts.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from datagen.errors import UserError
from datagen.sampleformat import json_value

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
MAX_PROMPT_CHARS = 2000
FORMATS = (".txt", ".jsonl", ".csv")
_FIELDS = {"id", "prompt", "category", "set", "negative_prompt", "seeds", "image"}
IMAGE_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Prompt:
    id: str
    """Stable id: letters, digits, '-' and '_' (no dots: it becomes part of shard keys)."""
    prompt: str
    category: str = ""
    set: str = ""
    """"object" (object-centric) or "scene" (scenic / camera motion), or empty."""
    negative_prompt: str | None = None
    seeds: tuple[int, ...] | None = None
    """Explicit seeds per replica; replica r uses seeds[r] when given."""
    source: str = ""
    """Where it was read: 'file:line'."""
    image: str | None = None
    """First frame for image-to-video models: absolute path of an image file (given relative
    to the prompt file's folder, or absolute)."""
    image_sha256: str | None = None
    """SHA-256 of the image file's bytes when the bank was read (part of the bank digest)."""


def derived_id(text: str) -> str:
    """Id of a prompt that has none: a hash of its whitespace-normalised text."""
    norm = " ".join(text.split())
    return "p" + hashlib.sha256(norm.encode("utf-8")).hexdigest()[:12]


def _decode_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    out = []
    for i, raw in enumerate(lines, start=1):
        try:
            out.append(raw.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as exc:
            raise UserError(
                f"{path}:{i}: not valid UTF-8 (byte {exc.start + 1} of the line); "
                "re-save the file as UTF-8"
            ) from None
    return out


def _make_prompt(
    where: str,
    text: object,
    pid: object = None,
    category: object = "",
    set_: object = "",
    negative: object = None,
    seeds: object = None,
    image: object = None,
    folder: Path | None = None,
) -> Prompt:
    if not isinstance(text, str):
        raise UserError(f"{where}: 'prompt' must be a string")
    text = text.strip()
    if not text:
        raise UserError(f"{where}: empty prompt; write the prompt text or delete the line")
    if len(text) > MAX_PROMPT_CHARS:
        raise UserError(
            f"{where}: prompt is {len(text)} characters, over the limit of {MAX_PROMPT_CHARS}; "
            "shorten it"
        )
    if pid is None or pid == "":
        pid = derived_id(text)
    if not isinstance(pid, str) or not ID_PATTERN.match(pid):
        raise UserError(
            f"{where}: bad id {pid!r}; ids are 1-64 letters, digits, '-' or '_' "
            "(no dots or spaces), starting with a letter or digit"
        )
    for name, value in (("category", category), ("set", set_)):
        if not isinstance(value, str):
            raise UserError(f"{where}: '{name}' must be a string")
    if set_ not in ("", "object", "scene"):
        raise UserError(f"{where}: 'set' must be 'object' or 'scene', got {set_!r}")
    if negative is not None and not isinstance(negative, str):
        raise UserError(f"{where}: 'negative_prompt' must be a string")
    seed_tuple = None
    if seeds is not None and seeds != "":
        if isinstance(seeds, str):
            try:
                seeds = [int(s) for s in re.split(r"[\s;]+", seeds.strip())]
            except ValueError:
                raise UserError(
                    f"{where}: 'seeds' must be integers separated by spaces or ';'"
                ) from None
        if not isinstance(seeds, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**63 for s in seeds
        ):
            raise UserError(f"{where}: 'seeds' must be a list of non-negative integers")
        seed_tuple = tuple(seeds)
    image_path, image_sha = _image_of(where, image, folder)
    return Prompt(
        id=pid,
        prompt=text,
        category=category,
        set=set_,
        negative_prompt=negative,
        seeds=seed_tuple,
        source=where,
        image=image_path,
        image_sha256=image_sha,
    )


def _image_of(where: str, image: object, folder: Path | None) -> tuple[str | None, str | None]:
    """A prompt's ``image`` field as (absolute path, sha256), checked to be a readable file."""
    if image is None or image == "":
        return None, None
    if not isinstance(image, str):
        raise UserError(f"{where}: 'image' must be a path string")
    path = Path(image).expanduser()
    if not path.is_absolute() and folder is not None:
        path = folder / path
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise UserError(
            f"{where}: image '{image}' is not one of {', '.join(IMAGE_FORMATS)}; "
            "convert it or fix the path"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(
            f"{where}: image '{image}' cannot be read ({exc.strerror}); paths are relative to "
            "the prompt file's folder"
        ) from None
    return str(path.resolve()), hashlib.sha256(data).hexdigest()


def _read_txt(path: Path) -> list[Prompt]:
    out = []
    for i, line in enumerate(_decode_lines(path), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        out.append(_make_prompt(f"{path}:{i}", line))
    return out


def _read_jsonl(path: Path) -> list[Prompt]:
    out = []
    for i, line in enumerate(_decode_lines(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            obj = json_value(line)
        except ValueError as exc:
            msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise UserError(f"{where}: not valid JSON ({msg}); one object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: each line must be a JSON object with a 'prompt' field")
        unknown = set(obj) - _FIELDS
        if unknown:
            raise UserError(
                f"{where}: unknown field(s) {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(_FIELDS))}"
            )
        if "prompt" not in obj:
            raise UserError(f"{where}: missing 'prompt' field")
        out.append(
            _make_prompt(
                where,
                obj["prompt"],
                obj.get("id"),
                obj.get("category", ""),
                obj.get("set", ""),
                obj.get("negative_prompt"),
                obj.get("seeds"),
                obj.get("image"),
                path.parent,
            )
        )
    return out


def _read_csv(path: Path) -> list[Prompt]:
    text = "\n".join(_decode_lines(path))
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if "prompt" not in header:
        raise UserError(f"{path}:1: CSV header must have a 'prompt' column (found: {header})")
    unknown = set(header) - _FIELDS
    if unknown:
        raise UserError(
            f"{path}:1: unknown column(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_FIELDS))}"
        )
    out = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row:
            raise UserError(f"{where}: more fields than the header has; quote commas in prompts")
        if not any((v or "").strip() for v in row.values()):
            continue
        out.append(
            _make_prompt(
                where,
                row.get("prompt") or "",
                row.get("id") or None,
                row.get("category") or "",
                row.get("set") or "",
                row.get("negative_prompt") or None,
                row.get("seeds") or None,
                row.get("image") or None,
                path.parent,
            )
        )
    return out


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".csv": _read_csv}


def prompt_files(path: Path) -> list[Path]:
    """The files a prompt path names: the file itself, or a folder's prompt files, sorted."""
    if not path.exists():
        raise UserError(f"prompt path {path} does not exist (--prompts)")
    if path.is_file():
        if path.suffix.lower() not in _READERS:
            raise UserError(
                f"{path}: unknown prompt format '{path.suffix}'; use {', '.join(FORMATS)}"
            )
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    unknown = [p for p in files if p.suffix.lower() not in _READERS]
    if unknown:
        raise UserError(
            f"{unknown[0]}: unknown prompt format '{unknown[0].suffix}' in the prompt folder; "
            f"use {', '.join(FORMATS)} or move the file out"
        )
    if not files:
        raise UserError(f"prompt folder {path} has no {', '.join(FORMATS)} files")
    return files


def load_prompts(path: Path | str) -> list[Prompt]:
    """Read a prompt file or folder; refuse duplicates ids and empty banks."""
    path = Path(path)
    prompts: list[Prompt] = []
    seen: dict[str, Prompt] = {}
    for f in prompt_files(path):
        try:
            items = _READERS[f.suffix.lower()](f)
        except OSError as exc:
            raise UserError(f"{f}: cannot be read ({exc.strerror})") from None
        for p in items:
            if p.id in seen:
                first = seen[p.id]
                what = "same prompt text" if first.prompt == p.prompt else "same id"
                raise UserError(
                    f"{p.source}: duplicate id '{p.id}' ({what} as {first.source}); "
                    "give each prompt its own id or remove the repeat"
                )
            seen[p.id] = p
            prompts.append(p)
    if not prompts:
        raise UserError(f"{path}: the prompt bank is empty")
    return prompts


def bank_digest(prompts: list[Prompt]) -> str:
    """Hash of the bank's content (ids, texts, seeds), recorded in the manifest."""
    h = hashlib.sha256()
    for p in prompts:
        rec = [p.id, p.prompt, p.category, p.set, p.negative_prompt, p.seeds]
        if p.image_sha256 is not None:
            # Only banks with images add it, so the digests of other banks stay as they were.
            rec.append(p.image_sha256)
        h.update(json.dumps(rec, sort_keys=True).encode())
    return h.hexdigest()[:16]
