"""The lineage check behind the quality bar: a video dataset's shards are read again and any text in them
(a caption member, a caption-like JSON field) is found and named; a shard that changed since the manifest
was written, went missing or holds another sample count makes the lineage unverified. The check on a real
chain of trained stages is in tests/test_training.py; a store whose weights have no training record is
in tests/test_evaluation_stage.py."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from training.lineage import check_dataset, scan_shard, text_fields


def write_tar(path: Path, members: dict[str, bytes]) -> str:
    """A tar of `members` (name -> bytes); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clip_members(key: str, meta: dict | None = None) -> dict[str, bytes]:
    meta = {"key": key, "url": f"http://127.0.0.1:1/{key}.mp4", "status": "success", "caption": None,
            "yt_meta_dict": None, **(meta or {})}
    return {f"{key}.mp4": b"\x00\x00\x00\x18ftypmp42" + key.encode(), f"{key}.json": json.dumps(meta).encode()}


def dataset(root: Path, shards: list[dict[str, bytes]], samples: list[int] | None = None) -> dict:
    """Shards under root/shards and the manifest that records them (their sha256 and sample counts)."""
    entries = []
    for i, members in enumerate(shards):
        name = f"shards/{i:05d}.tar"
        digest = write_tar(root / name, members)
        count = samples[i] if samples else len({m.split(".", 1)[0] for m in members})
        entries.append({"name": name, "samples": count, "sha256": digest})
    return {"kind": "videos", "inputs_hash": "h", "shards": entries,
            "sample": {"video": "mp4", "meta": "json", "text": None}}


def test_text_fields_finds_captions_at_any_depth_and_ignores_empty_ones():
    meta = {"caption": None, "name": " ", "url": "http://x/a.mp4", "yt_meta_dict": {"title": "A cat", "id": 3},
            "clips": [{"span": [0, 1]}, {"description": ["", "waves"]}], "tags": []}
    assert list(text_fields(meta)) == ["yt_meta_dict.title", "clips[1].description"]
    assert list(text_fields({"key": "001", "fps": 24.0, "source": {"width": 64}})) == []


def test_a_url_whose_file_name_is_a_caption_is_text():
    """Real WebVid contentUrls end in their caption; the toy world's and YouTube's do not."""
    webvid = ("https://ak.picdn.net/shutterstock/videos/5641526/preview/"
              "stock-footage-horse-grazing-seperated-on-green-screen.mp4")
    meta = {"url": webvid, "clips": [{"source_url": webvid}],
            "page_url": "http://127.0.0.1:8765/files/videos/1000002.mp4",
            "contentUrl": "https://www.youtube.com/watch?v=dQw4w9WgXcQ", "video_url": "http://h/a-b.mp4"}
    assert list(text_fields(meta)) == ["url", "clips[0].source_url"]
    assert list(text_fields({"link_text": webvid})) == []  # only URL keys are read as URLs


def test_a_clean_dataset_is_verified_and_counted(tmp_path):
    manifest = dataset(tmp_path, [{**clip_members("0001"), **clip_members("0002")}, clip_members("0100")])
    found = check_dataset(str(tmp_path), manifest)
    assert found["problems"] == [] and found["text_samples"] == 0 and found["text_examples"] == []
    assert found["samples"] == 3 and found["shards"] == 2 and found["members"] == {"json": 3, "mp4": 3}
    scanned = scan_shard(str(tmp_path / "shards/00000.tar"))
    assert scanned["sha256"] == manifest["shards"][0]["sha256"] and scanned["samples"] == 2


def test_caption_members_and_fields_are_found_and_named(tmp_path):
    shard = {**clip_members("0001"), "0001.txt": b"a dog on a beach",
             **clip_members("0002", {"yt_meta_dict": {"title": "surfing"}}), **clip_members("0003"),
             "0004.mp4": b"x", "0004.en.vtt": b"WEBVTT\n\n00:00.000 --> 00:01.000\nhello"}
    found = check_dataset(str(tmp_path), dataset(tmp_path, [shard]))
    assert found["text_samples"] == 3 and found["problems"] == []  # the data are as recorded, with text
    assert found["text_examples"] == ["shards/00000.tar:0001.txt", "shards/00000.tar:0002.json:yt_meta_dict.title",
                                      "shards/00000.tar:0004.en.vtt"]


def test_unreadable_metadata_counts_as_text(tmp_path):
    shard = {**clip_members("0001"), "0002.mp4": b"x", "0002.json": b"{not json"}
    found = check_dataset(str(tmp_path), dataset(tmp_path, [shard]))
    assert found["text_samples"] == 1 and found["text_examples"] == ["shards/00000.tar:0002.json: not JSON"]


@pytest.mark.parametrize("defect, expected", [
    ("changed", "changed since training"),
    ("missing", "missing"),
    ("count", "1 samples, the manifest records 5"),
    ("no_checksum", "no checksum recorded"),
    ("declared", "declares a text member"),
    ("empty", "lists no shard"),
    ("not_a_tar", "not a readable tar"),
])
def test_what_cannot_be_verified_is_a_named_problem(tmp_path, defect, expected):
    manifest = dataset(tmp_path, [clip_members("0001")])
    shard = tmp_path / "shards/00000.tar"
    if defect == "changed":
        write_tar(shard, clip_members("0001", {"fps": 30.0}))  # same sample, other bytes
    elif defect == "missing":
        shard.unlink()
    elif defect == "count":
        manifest["shards"][0]["samples"] = 5
    elif defect == "no_checksum":
        del manifest["shards"][0]["sha256"]
    elif defect == "declared":
        manifest["sample"]["text"] = "txt"
    elif defect == "empty":
        manifest["shards"] = []
    elif defect == "not_a_tar":
        shard.write_bytes(b"\x01" * 2048)
    problems = check_dataset(str(tmp_path), manifest)["problems"]
    assert len(problems) == 1 and expected in problems[0], problems
