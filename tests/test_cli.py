"""The `mav` command line, run as a user would: real subprocesses, real files, real HTTP on 127.0.0.1."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request

import pyarrow.parquet as pq
import yaml

MAV = [sys.executable, "-m", "pipelines.cli"]


def run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*MAV, *args], capture_output=True, text=True, timeout=300, env=os.environ.copy(), **kw)


def test_help_lists_only_working_commands():
    out = run("--help")
    assert out.returncode == 0
    for command in ("config", "world", "data", "demo"):
        assert command in out.stdout
    assert "not implemented" not in out.stdout.lower()


def test_config_prints_resolved_yaml_with_overrides():
    out = run("config", "--preset", "tiny", "--set", "world.seed=11", "--set", "train.prior.steps=3")
    assert out.returncode == 0, out.stderr
    tree = yaml.safe_load(out.stdout)
    assert tree["preset"] == "tiny" and tree["world"]["seed"] == 11 and tree["train"]["prior"]["steps"] == 3


def test_bad_config_value_is_one_clear_line_naming_the_field():
    out = run("config", "--preset", "tiny", "--set", "data.images.filters.punsafe_max=7")
    assert out.returncode == 2
    assert "data.images.filters.punsafe_max" in out.stderr and "Traceback" not in out.stderr


def test_world_generates_then_serves(tmp_path):
    out = run("world", "--out", str(tmp_path / "w"), "--preset", "tiny", "--seed", "3")
    assert out.returncode == 0, out.stderr
    assert "laion" in out.stdout and "ground_truth" in out.stdout
    table = pq.read_table(tmp_path / "w" / "laion.parquet")
    proc = subprocess.Popen([*MAV, "world", "serve", str(tmp_path / "w"), "--port", "0"], stdout=subprocess.PIPE,
                            text=True, env=os.environ.copy())
    try:
        line = proc.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        path = table.column("URL")[0].as_py().split("/", 3)[3]
        with urllib.request.urlopen(f"{url}/{path}", timeout=10) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_world_needs_an_output_folder():
    out = run("world")
    assert out.returncode == 2 and "--out" in out.stderr


def test_dataset_and_run_folders_keep_their_urls():
    """`--out s3://...` reaches the flows as written (a pathlib.Path would make it the local 's3:/...')."""
    from pipelines.cli import build_parser

    parser = build_parser()
    images = parser.parse_args(["data", "images", "s3://b/laion.parquet", "--out", "s3://b/data/images"])
    videos = parser.parse_args(["data", "videos", "--webvid", "gs://b/webvid.csv", "--out", "s3://b/data/videos"])
    train = parser.parse_args(["train", "clip", "--out", "s3://b/runs/x"])
    assert (images.out, images.metadata, videos.out, videos.webvid, train.out) == (
        "s3://b/data/images", ["s3://b/laion.parquet"], "s3://b/data/videos", ["gs://b/webvid.csv"], "s3://b/runs/x")
