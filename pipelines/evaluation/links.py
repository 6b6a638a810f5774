"""Link by link: where the cascade loses a prompt before the video stages (`mav evaluate --links`).

The quality bar scores the delivered video; when a prompt fails there, the question is which stage lost it.
For each evaluation prompt (its shape, colour, background and size), four links of the text -> key frame
chain are read against the toy world, with no learned judge:
- text: does the prompt's CLIP text embedding retrieve, among world renders of every (shape, colour) the
  prompt's background allows at its size, the prompt's own? (CLIP's text side kept what the prompt says);
- prior: the same retrieval for `draws` embeddings of the prior (share right);
- decoder: D from the TRUE CLIP image embedding of `draws` renders of the prompt's scene at the world's
  image positions (share whose object `detect_object` reads as the prompt's shape and colour): can D draw it?
- keyframe: D from the prior's `draws` embeddings (share read right): the image Dt is guided toward with
  `temporal.keyframe` set (before `temporal.keyframe_draws` re-ranks D's draws).
A prompt whose key frame is wrong is put down to one link (`first_lost`): with the prior's embedding right,
decoder (D cannot draw the scene even from its true embedding) or else keyframe (D draws the true embedding
but not the prior's); with it wrong, text (CLIP's text side already wrong) or else prior. Prompt i draws with
seed + i, so the same arguments give the same figures.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model.cascade import to_uint8
from model.cascade_stages import decode_images, image_embedding, sample_prior, text_embedding
from model.cascade_uses import to_base
from pipelines.evaluation.prompts import parse_prompt
from pipelines.evaluation.scorer import EvalConfig, detect_object
from pipelines.evaluation.tracking import experiment_of, weights_used
from pipelines.generate import load_cascade, tracking_uri_of
from pipelines.world.config import POSITIONS, WorldConfig
from pipelines.world.generate import backgrounds_for
from pipelines.world.shapes import HALF_EXTENT, render
from training.tracking import MlflowTracker, tracked_run

LINKS = ("text", "prior", "decoder", "keyframe")
JITTER = 0.03  # the world's LAION images sit within this of their named position (fraction of the side)


def prompt_sizes(world: WorldConfig, text: str) -> list[str]:
    """The size class a prompt names, or every size where it names none (a growing shape: the world's
    stills captioned that way show any size)."""
    named = parse_prompt(text).size
    return [named] if named else sorted(world.sizes, key=world.sizes.get)


def candidate_renders(world: WorldConfig, background: str,
                      sizes: Sequence[str]) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Every (shape, colour) the world draws on `background`, centred, at each of `sizes`: (shape, colour)
    labels and (K, S, S, 3) uint8."""
    side = world.image_size
    scenes = [(s, c, z) for s in world.shapes for c in world.colours if background in backgrounds_for(world, c)
              for z in sizes]
    images = np.stack([render(side, world.backgrounds[background], s, world.colours[c], side / 2, side / 2,
                              world.sizes[z] * side) for s, c, z in scenes])
    return [(s, c) for s, c, _ in scenes], images


def scene_renders(world: WorldConfig, shape: str, colour: str, background: str, sizes: Sequence[str], n: int,
                  rng: np.random.Generator) -> np.ndarray:
    """n renders of one scene as the world's LAION images place it (a named position, jittered, kept
    inside the frame; one of `sizes`, within 10%): (n, S, S, 3) uint8."""
    side, names = world.image_size, list(POSITIONS)
    out = []
    for _ in range(n):
        r = world.sizes[sizes[int(rng.integers(len(sizes)))]] * rng.uniform(0.9, 1.1)
        edge = HALF_EXTENT[shape] * r
        x, y = (float(np.clip(p + rng.uniform(-JITTER, JITTER), edge, 1 - edge))
                for p in POSITIONS[names[int(rng.integers(len(names)))]])
        out.append(render(side, world.backgrounds[background], shape, world.colours[colour], x * side, y * side,
                          r * side))
    return np.stack(out)


def _pixels(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _label(obj) -> str:
    return f"{obj.colour} {obj.shape}" if obj.found else "nothing"


def link_scores(cascade: Any, world: WorldConfig, prompts: Sequence[Any], draws: int = 8, seed: int = 0,
                eval_cfg: EvalConfig | None = None) -> list[dict]:
    """One row per prompt (`PromptSpec`s, or anything with text/shape/colour/background/held_out): the four
    links' scores in [0, 1] and what each link showed most often ("<colour> <shape>"). Prompt i's draws use
    seed + i, so a row depends only on its prompt and position."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    eval_cfg = eval_cfg or EvalConfig()
    banks: dict[tuple, tuple] = {}  # (background, sizes) -> (labels, CLIP embeddings of the renders)
    rows = []
    for i, spec in enumerate(prompts):
        missing = [k for k in ("shape", "colour", "background") if getattr(spec, k) is None]
        if missing:
            raise ValueError(f"prompt {spec.text!r} names no {', '.join(missing)}: its links cannot be read")
        sizes = prompt_sizes(world, spec.text)
        wanted = (spec.shape, spec.colour)
        generator = torch.Generator().manual_seed(seed + i)
        rng = np.random.default_rng([seed, i])
        with torch.no_grad():
            key = (spec.background, tuple(sizes))
            if key not in banks:
                labels, candidates = candidate_renders(world, spec.background, sizes)
                banks[key] = labels, image_embedding(cascade, to_base(cascade, _pixels(candidates)))  # (K, D)
            labels, bank = banks[key]
            text = text_embedding(cascade, [spec.text])  # (1, D)
            prior = sample_prior(cascade, [spec.text] * draws, generator)  # (n, D)
            scenes = scene_renders(world, spec.shape, spec.colour, spec.background, sizes, draws, rng)
            true = image_embedding(cascade, to_base(cascade, _pixels(scenes)))  # (n, D)
            images = decode_images(cascade, torch.cat([true, prior.to(true)]), generator)  # (2n, C, H, W)
            drawn = to_uint8(images[:, :, None])[:, 0].numpy()  # one-frame videos -> (2n, H, W, 3)
        picks = [labels[int(k)] for k in (torch.cat([text, prior.to(text)]) @ bank.T).argmax(dim=1)]
        reads = [detect_object(frame, eval_cfg) for frame in drawn]
        right = [(o.shape, o.colour) == wanted for o in reads]
        shown = {"text": [f"{c} {s}" for s, c in picks[:1]], "prior": [f"{c} {s}" for s, c in picks[1:]],
                 "decoder": [_label(o) for o in reads[:draws]], "keyframe": [_label(o) for o in reads[draws:]]}
        rows.append({
            "prompt": spec.text, "held_out": bool(spec.held_out), "sizes": sizes, "draws": draws,
            "text": float(picks[0] == wanted),
            "prior": float(np.mean([p == wanted for p in picks[1:]])),
            "decoder": float(np.mean(right[:draws])),
            "keyframe": float(np.mean(right[draws:])),
            **{f"{link}_shows": Counter(v).most_common(1)[0][0] for link, v in shown.items()},
        })
    return rows


def summarise_links(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean of each link over all prompts, the held-out ones and the seen ones (groups that have rows)."""
    if not rows:
        raise ValueError("no prompts to summarise")
    groups = {"all": rows, "held_out": [r for r in rows if r["held_out"]],
              "seen": [r for r in rows if not r["held_out"]]}
    return {name: {**{k: float(np.mean([r[k] for r in g])) for k in LINKS}, "prompts": float(len(g))}
            for name, g in groups.items() if g}


def first_lost(row: dict, threshold: float = 0.5) -> str | None:
    """Where a prompt whose key frame is wrong (under `threshold` of its draws right) was lost. The key
    frame is D's drawing of the prior's embedding: with the prior right, "decoder" if D misses even the true
    embedding, else "keyframe" (the prior's embedding lies off what D learnt); with the prior wrong, "text"
    if CLIP's text embedding is wrong too, else "prior". None while the key frame is right."""
    if row["keyframe"] >= threshold:
        return None
    if row["prior"] >= threshold:
        return "decoder" if row["decoder"] < threshold else "keyframe"
    return "text" if row["text"] < threshold else "prior"


_SHOWN = {"text": "text_shows", "prior": "prior_shows", "decoder": "decoder_shows", "keyframe": "keyframe_shows"}


def format_links(rows: Sequence[dict], summary: dict) -> str:
    lines = [f"  {'prompt':<62} {'held':>4} {'text':>5} {'prior':>5} {'D(true)':>7} {'key':>5}  lost at: what it shows"]
    for r in rows:
        lost = first_lost(r)
        lines.append(f"  {r['prompt'][:62]:<62} {'yes' if r['held_out'] else 'no':>4} {r['text']:>5.2f} "
                     f"{r['prior']:>5.2f} {r['decoder']:>7.2f} {r['keyframe']:>5.2f}  "
                     f"{lost or '-'}{'' if lost is None else ': ' + r[_SHOWN[lost]]}")
    for name, g in summary.items():
        lines.append(f"  {name.replace('_', '-') + ' (' + str(int(g['prompts'])) + ' prompts)':<62} {'':>4} "
                     f"{g['text']:>5.2f} {g['prior']:>5.2f} {g['decoder']:>7.2f} {g['keyframe']:>5.2f}")
    return "\n".join(lines)


def evaluate_links(cfg: Any, *, world: WorldConfig, prompts: Sequence[Any], out_dir: Any, weights: str = "mlflow",
                   tracking_uri: str | None = None, draws: int = 8, seed: int = 0, device: str | None = None,
                   parent_run_id: str | None = None) -> dict:
    """Load CLIP, the prior and D, read the links of every prompt, write links.json into `out_dir`, log an
    MLflow run "evaluate-links" (links/<name> metrics overall, links/held_out/..., links/seen/...) and print
    the table. Returns run_id, rows, summary, table."""
    started = time.perf_counter()
    uri = tracking_uri_of(cfg, tracking_uri)
    cascade = load_cascade(cfg, weights, uri, stop_at="prior", device=device, extra=("decoder",))
    rows = link_scores(cascade, world, prompts, draws, seed)
    summary = summarise_links(rows)
    table = format_links(rows, summary)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "links.json").write_text(json.dumps({"summary": summary, "prompts": rows}, indent=2))
    print(f"evaluate --links: {len(rows)} prompts x {draws} draws, {time.perf_counter() - started:.1f} s\n{table}")
    metrics = {f"links/{'' if name == 'all' else name + '/'}{k}": v
               for name, g in summary.items() for k, v in g.items() if k in LINKS}
    with tracked_run(MlflowTracker(uri, experiment_of(cfg)), "evaluate-links", parent_run_id=parent_run_id,
                     tags={"mav.stage": "evaluate-links"}) as tracker:
        tracker.log_params({"links": {"prompts": len(rows), "draws": draws, "seed": seed, "weights": weights},
                            "weights": weights_used(cascade, weights, uri)})
        tracker.log_metrics(metrics, step=0)
        tracker.log_artifact(str(out / "links.json"), "evaluation")
    return {"run_id": tracker.run_id, "rows": rows, "summary": summary, "metrics": metrics, "table": table}
