"""notebooks/compare_runs.ipynb executed top to bottom (nbclient, a kernel on this interpreter) against a
small but real MLflow sqlite store built here with training/tracking.py: a parent run with stage child runs,
sample artifacts logged by training/loop.py's own `write_preview`, evaluate runs and registered weights.
Nothing is trained (a real chain takes minutes, see tests/test_training.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from model.checkpoint import save_weights
from pipelines.evaluation.aggregate import SCORES, aggregate, summary_metrics
from pipelines.evaluation.tracking import run_tags
from pipelines.outputs import write_gif
from training.previews import write_preview
from training.tracking import MlflowTracker, default_tracking_uri, pipeline_parent_run, tracked_run

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "compare_runs.ipynb"
EXPERIMENT = "make-a-video"
KERNEL = "mav-notebook-test"
PNG, GIF = "image/png", "image/gif"


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory) -> Path:
    """A migrated, empty sqlite store: creating one costs seconds, copying it nothing."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, empty_db) -> str:
    """The tracking URI of a fresh store of this test's own, in tmp_path/run (artifacts: run/mlartifacts)."""
    (tmp_path / "run").mkdir()
    shutil.copy(empty_db, tmp_path / "run" / "mlflow.db")
    return default_tracking_uri(str(tmp_path / "run"))


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec running this interpreter (so the kernel sees this venv), first on JUPYTER_PATH; the
    kernel's Jupyter, IPython and matplotlib state go to the session's state folder, not the home."""
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "make-a-video tests", "language": "python"}))
    state = Path(os.environ.get("MAV_STATE_DIR", tmp_path))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for var, folder in (("JUPYTER_RUNTIME_DIR", "jupyter-runtime"), ("IPYTHONDIR", "ipython"),
                        ("MPLCONFIGDIR", "matplotlib")):
        monkeypatch.setenv(var, str(state / folder))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the injected parameter must be what is read
    return KERNEL


def execute(kernel: str, cwd: Path, **params) -> nbformat.NotebookNode:
    """Run the notebook with `params` injected in a cell right after its "parameters" cell (as papermill
    does); a cell that raises fails the test with the cell's traceback."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
    NotebookClient(nb, timeout=120, kernel_name=kernel, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def printed(nb: nbformat.NotebookNode) -> str:
    return "".join(o["text"] for o in outputs(nb) if o["output_type"] == "stream")


def html(nb: nbformat.NotebookNode) -> list[str]:
    return [o["data"]["text/html"] for o in outputs(nb) if "text/html" in o.get("data", {})]


def row(table_html: str, name: str) -> list[str]:
    """The cells of the row headed `name` in a pandas HTML table."""
    found = re.search(rf"<th>{re.escape(name)}</th>((?:\s*<td>[^<]*</td>)+)", table_html)
    assert found, f"no row {name!r} in the table"
    return re.findall(r"<td>([^<]*)</td>", found.group(1))


def shown(nb: nbformat.NotebookNode, plot: str) -> list:
    return [o for o in outputs(nb) if o["output_type"] == "display_data" and o["metadata"].get("plot") == plot]


def log_stage(factory, parent_id: str, stage: str, losses: list[float], previews: list[dict], folder: Path) -> str:
    """A stage's child run as jobs.run_stage + loop.Progress log it: loss/lr/samples_per_s per step, and
    the previews through loop.write_preview at steps 2, 4, ..."""
    with tracked_run(factory(), stage, parent_run_id=parent_id, tags={"stage": stage}) as tracker:
        for step, loss in enumerate(losses, start=1):
            tracker.log_metrics({"loss": loss, "lr": 1e-3 * step / len(losses), "samples_per_s": 40.0 + step}, step)
        for i, preview in enumerate(previews, start=1):
            write_preview(preview, folder / stage, tracker, 2 * i)
    return tracker.run_id


def register(tracker_uri: str, run_id: str, stage: str, folder: Path) -> int:
    tracker = MlflowTracker(tracker_uri, EXPERIMENT)
    tracker.start(stage, resume_run_id=run_id)
    path = save_weights({"w": torch.full((4,), float(len(stage)))}, folder / f"{stage}.safetensors",
                        {"config": {"stage": stage, "channels": 4}})
    version = tracker.register_weights(stage, str(path))
    tracker.end()
    return version


def log_evaluate(uri: str, quality: float, folder: Path) -> str:
    """An "evaluate" run as pipelines.evaluation.run logs it: eval/... metrics, weights tags, GIFs."""
    rows = [{**{k: quality for k in SCORES}, "moving": True, "motion_ok": True, "motion_match": None,
             "held_out": held} for held in (True, False)]
    summary = {**aggregate(rows), "clipsim": quality / 3}
    used = {"prior": {"name": "mav-prior", "version": 1}, "decoder": {"name": "mav-decoder", "version": 1}}
    (folder / "samples").mkdir(parents=True)
    for i in range(2):
        frames = torch.randint(0, 255, (4, 8, 8, 3), dtype=torch.uint8).numpy()  # (F, H, W, 3)
        write_gif(frames, folder / "samples" / f"{i:03d}.gif", 8)
    with tracked_run(MlflowTracker(uri, EXPERIMENT), "evaluate", tags=run_tags(used, summary)) as tracker:
        tracker.log_metrics(summary_metrics(summary), step=0)
        tracker.log_artifact(str(folder / "samples"), "evaluation/samples")
    return tracker.run_id


def test_notebook_compares_the_latest_pipeline_run(tmp_path, store, kernel):
    uri = store
    factory = lambda: MlflowTracker(uri, EXPERIMENT)  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    with pipeline_parent_run(factory, "train") as old:  # an earlier pipeline run: not the default choice
        old_child = log_stage(factory, old.run_id, "decoder", [3.0, 2.0], [], tmp_path / "old")
    with pipeline_parent_run(factory, "train", tags={"stages": "prior,decoder,temporal"}) as parent:
        ids = {
            "prior": log_stage(factory, parent.run_id, "prior", [1.0, 0.8, 0.7, 0.6], [], tmp_path / "p"),
            "decoder": log_stage(factory, parent.run_id, "decoder", [0.9, 0.5, 0.4, 0.35],
                                 [{"images": torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1}] * 2, tmp_path / "p"),
            "temporal": log_stage(factory, parent.run_id, "temporal", [0.7, 0.6, 0.5],
                                  [{"video": torch.rand(2, 3, 4, 8, 8, generator=gen) * 2 - 1}], tmp_path / "p"),
        }
    versions = {s: register(uri, ids[s], s, tmp_path / "weights") for s in ("prior", "decoder")}
    evals = [log_evaluate(uri, q, tmp_path / f"eval{i}") for i, q in enumerate((0.5, 0.9))]

    nb = execute(kernel, tmp_path, TRACKING_URI=uri, EXPERIMENT=EXPERIMENT, FIGURES_DIR=str(tmp_path / "figs"))

    assert not [o for o in outputs(nb) if o["output_type"] == "error"]
    text, tables = printed(nb), "\n".join(html(nb))
    assert parent.run_id in text and old.run_id not in text and old_child not in tables
    losses = {o["metadata"]["stage"]: o for o in shown(nb, "loss")}
    assert sorted(losses) == sorted(ids) and all(PNG in o["data"] for o in losses.values())
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(f"loss_{s}.png" for s in ids)
    samples = {o["metadata"]["stage"]: o for o in shown(nb, "sample")}
    assert set(samples) == {"decoder", "temporal"}  # the prior logs preview metrics, no images
    assert PNG in samples["decoder"]["data"] and GIF in samples["temporal"]["data"]
    assert "decoder: samples/step_0000004.png (latest of 2)" in text and "prior: no sample artifacts" in text
    assert all(run_id in tables for run_id in ids.values())
    eval_table = next(t for t in html(nb) if "eval/prompt_faithfulness" in t)
    assert eval_table.index(evals[0][:8]) < eval_table.index(evals[1][:8])  # side by side, oldest first
    assert [float(v) for v in row(eval_table, "eval/prompt_faithfulness")] == [0.5, 0.9]
    assert [float(v) for v in row(eval_table, "eval/held_out/motion_share")] == [1.0, 1.0]
    assert [float(v) for v in row(eval_table, "eval/quality_bar")] == [0.0, 1.0]
    weights_table = next(t for t in html(nb) if "<th>quality_bar</th>" in t)
    assert row(weights_table, "quality_bar") == ["fail", "pass"]
    assert row(weights_table, "decoder") == ["mav-decoder/1", "mav-decoder/1"]
    gifs = shown(nb, "evaluate")
    assert len(gifs) == 2 and all(GIF in o["data"] and o["metadata"]["run_id"] == evals[-1] for o in gifs)
    registry = next(t for t in html(nb) if "this_parent" in t)
    assert versions == {"prior": 1, "decoder": 1}
    for stage in versions:  # name, version, alias, made by this parent, run
        assert row(registry, stage)[:5] == [f"mav-{stage}", "1", "current", "True", ids[stage]]
    assert "<th>temporal</th>" not in registry  # never registered


def test_notebook_degrades_when_runs_are_missing(tmp_path, store, kernel):
    """A pipeline run still in its first stages: no samples, no evaluate run, nothing registered yet."""
    uri = store
    factory = lambda: MlflowTracker(uri, EXPERIMENT)  # noqa: E731
    with pipeline_parent_run(factory, "train") as parent:
        log_stage(factory, parent.run_id, "clip", [2.0, 1.5, 1.2], [], tmp_path)
        factory().start("prior", parent_run_id=parent.run_id, tags={"stage": "prior"})  # still before step 1

    nb = execute(kernel, tmp_path, TRACKING_URI=uri, PARENT_RUN_ID=parent.run_id)

    assert not [o for o in outputs(nb) if o["output_type"] == "error"]
    text = printed(nb)
    assert [o["metadata"]["stage"] for o in shown(nb, "loss")] == ["clip"]
    assert "prior: no loss logged yet" in text and "clip: no sample artifacts" in text
    assert f"no evaluate run yet in experiment {EXPERIMENT!r}" in text
    assert "no registered model versions yet" in text
    assert not shown(nb, "sample") and not shown(nb, "evaluate")
