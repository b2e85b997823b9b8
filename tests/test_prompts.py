import json

import pytest

from datagen.errors import UserError
from datagen.prompts import MAX_PROMPT_CHARS, derived_id, load_prompts
from tests.conftest import ROOT


def write(path, text, mode="w"):
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_shipped_bank_is_large_varied_and_valid():
    prompts = load_prompts(ROOT / "prompts")
    assert len(prompts) >= 200
    cats = {p.category for p in prompts}
    assert {"animals", "people", "vehicles", "objects", "camera"} <= cats
    assert {p.set for p in prompts} == {"object", "scene"}
    assert len({p.id for p in prompts}) == len(prompts)


def test_txt_ids_derive_from_text_not_position(tmp_path):
    a = load_prompts(write(tmp_path / "a.txt", "a dog runs\n\n# comment\na cat jumps\n"))
    b = load_prompts(write(tmp_path / "b.txt", "a bird flies\na cat jumps\na dog runs\n"))
    ids_a = {p.prompt: p.id for p in a}
    ids_b = {p.prompt: p.id for p in b}
    assert ids_a["a dog runs"] == ids_b["a dog runs"] == derived_id("a  dog runs ")
    assert ids_a["a cat jumps"] == ids_b["a cat jumps"]
    assert [p.source for p in a] == [f"{tmp_path / 'a.txt'}:1", f"{tmp_path / 'a.txt'}:4"]


def test_jsonl_fields_and_seeds(tmp_path):
    lines = [
        {
            "id": "dog-1",
            "prompt": "a dog",
            "category": "animals",
            "set": "object",
            "seeds": [3, 4],
            "negative_prompt": "blurry",
        },
        {"prompt": "a cat"},
    ]
    f = write(tmp_path / "b.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n")
    p = load_prompts(f)
    assert p[0].id == "dog-1" and p[0].seeds == (3, 4) and p[0].negative_prompt == "blurry"
    assert p[1].id == derived_id("a cat") and p[1].category == ""


def test_csv_with_quoted_commas(tmp_path):
    f = write(tmp_path / "b.csv", 'id,prompt,seeds\nx1,"a dog, running",7;8\n,a cat,\n')
    p = load_prompts(f)
    assert p[0].prompt == "a dog, running" and p[0].seeds == (7, 8)
    assert p[1].id == derived_id("a cat")


def test_folder_reads_all_formats_sorted(tmp_path):
    write(tmp_path / "b.txt", "second\n")
    write(tmp_path / "a.jsonl", '{"id": "first", "prompt": "first prompt"}\n')
    assert [p.prompt for p in load_prompts(tmp_path)] == ["first prompt", "second"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "dup.jsonl",
            '{"id":"a","prompt":"x"}\n{"id":"a","prompt":"y"}\n',
            r"dup\.jsonl:2: duplicate id 'a' \(same id as .*dup\.jsonl:1\)",
        ),
        ("dup.txt", "same\nother\nsame\n", r"dup\.txt:3: duplicate id .*same prompt text"),
        ("empty.jsonl", '{"id":"a","prompt":"   "}\n', r"empty\.jsonl:1: empty prompt"),
        ("long.txt", "x" * (MAX_PROMPT_CHARS + 1) + "\n", r"long\.txt:1: prompt is 2001 char"),
        ("enc.txt", b"fine\nbad \xff byte\n", r"enc\.txt:2: not valid UTF-8"),
        ("fmt.yaml", "- a\n", r"fmt\.yaml: unknown prompt format '\.yaml'"),
        ("json.jsonl", '{"prompt": "a"}\n{"prompt": \n', r"json\.jsonl:2: not valid JSON"),
        ("field.jsonl", '{"prompt": "a", "colour": 1}\n', r"field\.jsonl:1: unknown field"),
        ("id.jsonl", '{"id": "a.b", "prompt": "a"}\n', r"id\.jsonl:1: bad id 'a\.b'"),
        ("set.jsonl", '{"prompt": "a", "set": "both"}\n', r"set\.jsonl:1: 'set' must be"),
        ("seed.csv", "prompt,seeds\na,x\n", r"seed\.csv:2: 'seeds' must be integers"),
        ("hdr.csv", "text\na\n", r"hdr\.csv:1: CSV header must have a 'prompt' column"),
        ("none.txt", "\n# only a comment\n", r"none\.txt: the prompt bank is empty"),
    ],
)
def test_bad_prompt_files_name_file_and_line(tmp_path, name, content, message):
    f = write(tmp_path / name, content)
    with pytest.raises(UserError, match=message):
        load_prompts(f)


def test_duplicate_across_files_in_a_folder(tmp_path):
    write(tmp_path / "a.txt", "a dog runs\n")
    write(tmp_path / "b.txt", "a dog runs\n")
    with pytest.raises(UserError, match=r"b\.txt:1: duplicate id .*a\.txt:1"):
        load_prompts(tmp_path)


def test_missing_path_and_unknown_file_in_folder(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_prompts(tmp_path / "nope")
    write(tmp_path / "a.txt", "x\n")
    write(tmp_path / "notes.md", "x\n")
    with pytest.raises(UserError, match=r"notes\.md: unknown prompt format"):
        load_prompts(tmp_path)
