"""Croissant 1.0 metadata (JSON-LD) for a release: `croissant.json`.

Dataset tracks at ML venues ask for Croissant; `mlcroissant validate` checks its structure
and `mlcroissant load` reads records from it, checking each shard's sha256 on the way.

* every shard is a ``cr:FileObject`` (``contentUrl`` relative to the release folder, size,
  sha256 from the manifest, ``application/x-tar``);
* per shard kind (core, features, rejected) and member (``json``, ``mp4``, ``tracks.npy`` ...)
  a ``cr:FileSet`` of the tar members with that extension, contained in that kind's shards;
* per kind and member a ``cr:RecordSet`` named ``KIND_MEMBER`` (``core_json``,
  ``core_tracks_npy``, ``features_qk_safetensors``) with two fields: ``key`` (the sample key,
  from the member's file name) and the member's bytes (``fileProperty: content``).
  mlcroissant reads members inside archives only by file property, not by JSON path, so the
  sample metadata is one JSON text per record and the arrays are the bytes of their
  ``.npy`` / ``.safetensors`` files (the card's "Load it" section says how to decode them).
"""

from __future__ import annotations

import re
from typing import Any

CROISSANT = "croissant.json"
CONFORMS = "http://mlcommons.org/croissant/1.0"

# The standard Croissant 1.0 JSON-LD context (as in mlcommons/croissant's 1.0 examples).
CONTEXT: dict[str, Any] = {
    "@language": "en",
    "@vocab": "https://schema.org/",
    "citeAs": "cr:citeAs",
    "column": "cr:column",
    "conformsTo": "dct:conformsTo",
    "cr": "http://mlcommons.org/croissant/",
    "rai": "http://mlcommons.org/croissant/RAI/",
    "data": {"@id": "cr:data", "@type": "@json"},
    "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "dct": "http://purl.org/dc/terms/",
    "equivalentProperty": "cr:equivalentProperty",
    "examples": {"@id": "cr:examples", "@type": "@json"},
    "extract": "cr:extract",
    "field": "cr:field",
    "fileProperty": "cr:fileProperty",
    "fileObject": "cr:fileObject",
    "fileSet": "cr:fileSet",
    "format": "cr:format",
    "includes": "cr:includes",
    "isLiveDataset": "cr:isLiveDataset",
    "jsonPath": "cr:jsonPath",
    "key": "cr:key",
    "md5": "cr:md5",
    "parentField": "cr:parentField",
    "path": "cr:path",
    "recordSet": "cr:recordSet",
    "references": "cr:references",
    "regex": "cr:regex",
    "repeated": "cr:repeated",
    "replace": "cr:replace",
    "samplingRate": "cr:samplingRate",
    "sc": "https://schema.org/",
    "separator": "cr:separator",
    "source": "cr:source",
    "subField": "cr:subField",
    "transform": "cr:transform",
}

# What each member's bytes are, and the Croissant data type of the field that holds them.
MEMBER_TYPES = {
    "json": ("application/json", "sc:Text", "the sample's metadata (JSON text)"),
    "mp4": ("video/mp4", "sc:VideoObject", "the generated video (H.264 in MP4)"),
    "npy": ("application/x-npy", "sc:Text", "bytes of a NumPy .npy file (numpy.load)"),
    "safetensors": (
        "application/octet-stream",
        "sc:Text",
        "bytes of a safetensors file (safetensors.numpy.load)",
    ),
}


def _member_type(member: str) -> tuple[str, str, str]:
    return MEMBER_TYPES.get(member.rsplit(".", 1)[-1], ("application/octet-stream", "sc:Text",
                                                         "raw bytes"))  # fmt: skip


def _license_url(license_id: str) -> str:
    return f"https://spdx.org/licenses/{license_id}.html"


def _slug(member: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", member)


def record_set_name(kind: str, member: str) -> str:
    return f"{kind}_{_slug(member)}"


def croissant_doc(
    name: str,
    version: str,
    license_id: str,
    manifest: dict[str, Any],
    description: str,
    cite: str,
    published: str,
    url: str | None = None,
) -> dict[str, Any]:
    """The Croissant document of a release whose data folder holds ``manifest``'s shards."""
    distribution: list[dict[str, Any]] = []
    record_sets: list[dict[str, Any]] = []
    for kind in ("core", "features", "rejected"):
        shards = [s for s in manifest["shards"] if s["kind"] == kind]
        members = (manifest["members"].get("core" if kind == "rejected" else kind)) or []
        if kind == "rejected":
            members = sorted(set(members) | set(manifest["members"].get("features", [])))
        if not shards:
            continue
        for s in shards:
            distribution.append({
                "@type": "cr:FileObject",
                "@id": s["path"],
                "name": s["path"],
                "description": f"{kind} shard {s['index']}: {s['samples']} samples",
                "contentUrl": f"data/{s['path']}",
                "contentSize": f"{s['bytes']} B",
                "encodingFormat": "application/x-tar",
                "sha256": s["sha256"],
            })
        for member in members:
            fmt, dtype, what = _member_type(member)
            files = f"files_{record_set_name(kind, member)}"
            distribution.append({
                "@type": "cr:FileSet",
                "@id": files,
                "name": files,
                "description": f"the {member} member of every sample in the {kind} shards",
                "containedIn": [{"@id": s["path"]} for s in shards],
                "encodingFormat": fmt,
                "includes": f"*.{member}",
            })
            rs = record_set_name(kind, member)
            source = {"fileSet": {"@id": files}}
            record_sets.append({
                "@type": "cr:RecordSet",
                "@id": rs,
                "name": rs,
                "description": f"{kind} samples: key and {member}",
                "key": {"@id": f"{rs}/key"},
                "field": [
                    {
                        "@type": "cr:Field",
                        "@id": f"{rs}/key",
                        "name": "key",
                        "description": "the sample key (the same in every shard kind)",
                        "dataType": "sc:Text",
                        "source": {
                            **source,
                            "extract": {"fileProperty": "filename"},
                            "transform": {"regex": rf"^(.+)\.{re.escape(member)}$"},
                        },
                    },
                    {
                        "@type": "cr:Field",
                        "@id": f"{rs}/{_slug(member)}",
                        "name": member,
                        "description": what,
                        "dataType": dtype,
                        "source": {**source, "extract": {"fileProperty": "content"}},
                    },
                ],
            })
    doc: dict[str, Any] = {
        "@context": CONTEXT,
        "@type": "sc:Dataset",
        "name": name,
        "description": description,
        "conformsTo": CONFORMS,
        "citeAs": cite,
        "creator": {"@type": "sc:Organization", "name": "datagen"},
        "license": _license_url(license_id),
        "url": url or f"https://huggingface.co/datasets/{name}",
        "version": version,
        "datePublished": published,
        "keywords": ["video", "point tracking", "diffusion transformers", "attention"],
        "distribution": distribution,
        "recordSet": record_sets,
    }
    return doc


def check_croissant(doc: Any, manifest: dict[str, Any]) -> list[str]:
    """Problems (one line each) between a release's croissant.json and its manifest: every
    shard described once with the manifest's sha256 and size, nothing else described."""
    if not isinstance(doc, dict) or not isinstance(doc.get("distribution"), list):
        return [f"{CROISSANT}: no distribution list"]
    objects = {
        d.get("contentUrl"): d
        for d in doc["distribution"]
        if isinstance(d, dict) and d.get("@type") == "cr:FileObject"
    }
    problems = []
    for s in manifest["shards"]:
        obj = objects.pop(f"data/{s['path']}", None)
        if obj is None:
            problems.append(f"{CROISSANT}: data/{s['path']} is not described")
            continue
        if obj.get("sha256") != s["sha256"]:
            problems.append(
                f"{CROISSANT}: data/{s['path']} sha256 {obj.get('sha256')}, data/manifest.json "
                f"has {s['sha256']}"
            )
        if obj.get("contentSize") != f"{s['bytes']} B":
            problems.append(f"{CROISSANT}: data/{s['path']} contentSize {obj.get('contentSize')}, "
                            f"data/manifest.json has {s['bytes']} B")  # fmt: skip
    for extra in sorted(str(u) for u in objects):
        problems.append(f"{CROISSANT}: describes {extra}, which data/manifest.json does not list")
    return problems
