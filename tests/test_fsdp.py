"""FSDP2 sharding (`train.<stage>.sharding: fsdp`) for real on CPU: two processes joined by gloo run the
training loop (`training.loop.run` with `LocalWorker`) on the tiny decoder, with gradient accumulation,
clipping that bites at every step, the EMA and previews; one process runs the same stage unsharded.

One module fixture spawns the two workers once for three jobs: a full run (checkpoints at steps 2 and 4),
a run resumed from the full run's step-2 checkpoint, and the untrained weights saved sharded.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image, ImageDraw

from model.cascade import build_cascade
from model.cascade_stages import decode_images
from model.checkpoint import load_weights
from model.config import cascade_preset
from training.checkpoints import State, report_checkpoint, save_checkpoint
from training.config import train_preset
from training.job import Job
from training.jobs import job_config
from training.loop import build_state, run
from training.sharding import is_sharded, local
from training.stages import SampleRng, Stage
from training.tracker import NullTracker
from training.workers import LocalWorker

STEPS, SAMPLES, EMB_DIM = 4, 16, 32


class Recorder(NullTracker):
    """Keeps what rank 0 logs: metrics by name and step, and the previews' artifact folders."""

    def __init__(self) -> None:
        self.metrics: dict[str, dict[int, float]] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.metrics.setdefault(name, {})[step] = value

    def log_artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        self.artifacts.append(str(artifact_path))


def image_dataset(root: Path, size: int) -> Path:
    """One shard of coloured discs in img2dataset's layout, with random unit CLIP embeddings beside it."""
    (root / "shards").mkdir(parents=True)
    (root / "embeddings").mkdir()
    rng = np.random.default_rng(0)
    keys = [f"00000{i:04d}" for i in range(SAMPLES)]
    with wds.TarWriter(str(root / "shards" / "00000.tar")) as sink:
        for key in keys:
            img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
            ImageDraw.Draw(img).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(250, 30, 30))
            buf = io.BytesIO()
            img.save(buf, format="JPEG")
            sink.write({"__key__": key, "jpg": buf.getvalue(), "txt": "a red disc"})
    emb = rng.standard_normal((2, SAMPLES, EMB_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    column = {name: pa.FixedSizeListArray.from_arrays(pa.array(e.ravel()), EMB_DIM)
              for name, e in zip(("image_emb", "text_emb"), emb)}
    pq.write_table(pa.table({"key": keys, **column}), root / "embeddings" / "00000.parquet")
    manifest = {"kind": "images", "shards": [{"name": "shards/00000.tar", "samples": SAMPLES}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def decoder_config(data: Path, run_root: Path, sharding: str | None, workers: int) -> dict:
    train = train_preset("tiny")
    decoder = train.decoder.model_copy(update={
        "steps": STEPS, "batch_size": 4, "grad_accum": 2, "grad_clip": 0.01, "ema_decay": 0.9,
        "checkpoint_every": 2, "log_every": 1, "sample_every": 2, "num_workers": workers, "sharding": sharding,
        "loader_workers": 0})
    cfg = SimpleNamespace(cascade=cascade_preset("tiny"), train=train.model_copy(update={"decoder": decoder}))
    return job_config("decoder", cfg, str(data), str(run_root))


def fixed_batch(rank: int, world: int) -> dict[str, torch.Tensor]:
    """This rank's rows of one global decoder batch of 4."""
    g = torch.Generator().manual_seed(3)
    batch = {"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1,
             "image_emb": torch.nn.functional.normalize(torch.randn(4, EMB_DIM, generator=g), dim=-1),
             "seed": torch.arange(4)}
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    return {k: v[rows] for k, v in batch.items()}


def grad_norm(stage: Stage, state: State, batch: dict[str, torch.Tensor]) -> float:
    """What clip_grad_norm_ measures of the gradients of the batch's loss (all ranks' rows together)."""
    stage.loss(state.net, batch, SampleRng(batch["seed"])).backward()
    norm = torch.nn.utils.clip_grad_norm_(state.raw.parameters(), float("inf"))
    state.optimizer.zero_grad(set_to_none=True)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_untrained(job: Job, worker: LocalWorker) -> dict:
    """Checkpoint the seeded initial state as the loop does (every rank joining); what the ranks hold."""
    stage, state = build_state(job, worker)
    report_checkpoint(job, worker, state, {"step": 0})
    share = sum(local(p).numel() for p in state.raw.parameters()) / sum(p.numel() for p in state.raw.parameters())
    return {"sharded": is_sharded(state.raw) and all(is_sharded(m) for m in state.raw.down),
            "ema_sharded": is_sharded(state.ema.module), "local_share": share,
            "grad_norm": grad_norm(stage, state, fixed_batch(worker.rank, worker.world))}


def fsdp_worker(rank: int, world: int, port: int, config: dict, root: str) -> None:
    """One of the two gloo processes: the full run, the resumed run, the untrained weights (module doc)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(root)
    try:
        recorders = {}
        for name in ("full", "resumed"):
            if name == "resumed" and rank == 0:
                shutil.copytree(out / "full" / "step_0000002", out / "resumed" / "step_0000002")
            dist.barrier()
            recorders[name] = Recorder()
            run(Job.from_config(config), LocalWorker(out / name), recorders[name])
        facts = save_untrained(Job.from_config(config), LocalWorker(out / "untrained"))
        if rank == 0:
            (out / "facts.json").write_text(json.dumps({"facts": facts, **{
                name: {"metrics": r.metrics, "artifacts": r.artifacts} for name, r in recorders.items()}}))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = image_dataset(root / "images", cascade_preset("tiny").shape.base_size)
    fsdp, single = root / "fsdp", root / "single"
    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # before the children import torch: one core each
    try:
        torch.multiprocessing.spawn(fsdp_worker, args=(2, free_port(), decoder_config(data, fsdp, "fsdp", 2),
                                                       str(fsdp)), nprocs=2)
    finally:
        os.environ.pop("OMP_NUM_THREADS") if threads is None else os.environ.update(OMP_NUM_THREADS=threads)
    config = decoder_config(data, single, None, 1)
    one = Recorder()
    run(Job.from_config(config), LocalWorker(single / "full"), one)
    stage, state = build_state(Job.from_config(config), LocalWorker(single / "untrained"))
    (single / "untrained").mkdir()
    save_checkpoint(single / "untrained", Job.from_config(config), state)
    return SimpleNamespace(fsdp=fsdp, single=single, one=one, grad_norm=grad_norm(stage, state, fixed_batch(0, 1)),
                           **json.loads((fsdp / "facts.json").read_text()))


def weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    return load_weights(folder / name)[0]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    for name in ("weights.safetensors", "raw.safetensors"):
        wa, wb = weights(a, name), weights(b, name)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=f"{name} {key}")


def test_the_workers_hold_shards_of_the_network_and_of_its_ema(runs) -> None:
    assert runs.facts["sharded"] and runs.facts["ema_sharded"]
    assert 0.4 < runs.facts["local_share"] < 0.6


def test_the_clipped_norm_of_sharded_gradients_is_the_global_norm(runs) -> None:
    """clip_grad_norm_ over the DTensor gradients of two workers' halves of a batch gives the norm one
    worker (or DDP, whose gradients are the full ones on every rank) measures on the whole batch."""
    assert runs.facts["grad_norm"] == pytest.approx(runs.grad_norm, rel=1e-5)


def test_two_fsdp_workers_train_as_one_worker_on_the_same_global_batch(runs) -> None:
    """Losses step by step, then the trained weights and the EMA at both checkpoints; grad_clip 0.01 clips
    every step, so the sharded global norm must be the single worker's."""
    sharded, single = runs.full["metrics"]["loss"], runs.one.metrics["loss"]
    assert sorted(int(s) for s in sharded) == sorted(single) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([sharded[str(s)] for s in single], list(single.values()), rtol=1e-5, atol=1e-6)
    for step in ("step_0000002", "step_0000004"):
        assert_same_weights(runs.fsdp / "full" / step, runs.single / "full" / step, atol=2e-5)
    trained, untrained = weights(runs.fsdp / "full" / "step_0000004", "weights.safetensors"), \
        weights(runs.fsdp / "untrained" / "step_0000000", "weights.safetensors")
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)
    assert runs.full["artifacts"] == ["samples", "samples"]  # a preview at steps 2 and 4, from the gathered EMA


def test_a_checkpoint_saved_sharded_samples_as_the_same_weights_saved_whole(runs) -> None:
    """The untrained (seeded) weights: gathered by the FSDP workers and written by rank 0, against one
    process's save; the files match tensor for tensor and the sampler draws the same images from them."""
    sharded, whole = runs.fsdp / "untrained" / "step_0000000", runs.single / "untrained"
    assert_same_weights(sharded, whole, atol=0)
    cfg = cascade_preset("tiny")
    emb = torch.nn.functional.normalize(torch.randn(2, EMB_DIM, generator=torch.Generator().manual_seed(1)), dim=-1)
    images = []
    for folder in (sharded, whole):
        cascade = build_cascade(cfg, {"decoder": weights(folder, "weights.safetensors")}, stages=["decoder"])
        images.append(decode_images(cascade, emb, torch.Generator().manual_seed(0)))
    assert torch.equal(images[0], images[1])
    assert images[0].shape == (2, 3, cfg.shape.base_size, cfg.shape.base_size)


def test_a_sharded_run_resumes_from_its_checkpoint_as_if_never_stopped(runs) -> None:
    """Resumed at step 2 (weights, EMA, AdamW's moments, LR schedule, step counter): steps 3 and 4 log the
    losses of the uninterrupted run and end on its weights."""
    resumed, full = runs.resumed["metrics"], runs.full["metrics"]
    assert resumed["resumed_at_step"] == {"2": 2}
    assert sorted(resumed["loss"]) == ["3", "4"]
    np.testing.assert_allclose([resumed["loss"][s] for s in ("3", "4")], [full["loss"][s] for s in ("3", "4")],
                               rtol=1e-6)
    assert json.loads((runs.fsdp / "resumed" / "step_0000004" / "state.json").read_text())["step"] == STEPS
    assert_same_weights(runs.fsdp / "resumed" / "step_0000004", runs.fsdp / "full" / "step_0000004", atol=1e-6)
