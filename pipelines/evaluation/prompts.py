"""What an evaluation asks for: prompts parsed with the toy world's vocabulary, and fixed prompt sets.

`parse_prompt` reads the world's image and video caption phrasings (the templates of
`pipelines.world.generate`). `prompt_set` draws video prompts phrased as the world's captions, and includes
held-out combinations: shape/colour/background triples that no LAION row of the world contains, so the text
side never saw them (the paper's claim is that the cascade composes what it learned from images and from
video).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import pyarrow.parquet as pq

from pipelines.world.config import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, WorldConfig
from pipelines.world.generate import VIDEO_TEMPLATES, WHERE, fix_articles, plan_images, renderable_triples
from pipelines.world.videos import DIRECTIONS, caption_directions

Triple = tuple[str, str, str]  # (shape, colour, background)
# Word stems of the motions, in the order they are tried ("moving to the left" is a drift).
MOTION_WORDS = {"drift": "drift", "bounc": "bounce", "grow": "grow", "pan": "pan", "mov": "drift"}
_DIRECTED = r"(?:drifting|drifts|drift|moving|moves|pans|panning|pan)"


@dataclass(frozen=True)
class Prompt:
    """What a caption asks for; None where it does not say."""

    shape: str | None = None
    colour: str | None = None
    background: str | None = None
    size: str | None = None
    position: str | None = None
    motion: str | None = None
    direction: str | None = None


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def parse_prompt(text: str) -> Prompt:
    """Parse the world's image and video caption phrasings (and free variations of them: word order,
    'grey', 'centre', plural shapes). The background is '<name> background' or 'on/against <name>'; the
    object's colour is the colour word nearest before the shape word once the background is removed."""
    t = " " + re.sub(r"[^a-z ]+", " ", text.lower().replace("grey", "gray").replace("centre", "center")) + " "
    t = re.sub(r"\s+", " ", t)
    bg_names, shapes = _alternation(BACKGROUNDS), _alternation(SHAPES)
    match = re.search(rf"\b({bg_names}) background\b", t) or \
        re.search(rf"\b(?:on|against) (?:an? |the )?({bg_names})\b(?! (?:{shapes})s?\b)", t)
    background = match.group(1) if match else None
    rest = t[:match.start(1)] + t[match.end(1):] if match else t
    shape_match = re.search(rf"\b({shapes})s?\b", rest)
    colour_matches = list(re.finditer(rf"\b({_alternation(COLOURS)})\b", rest))
    before = [m for m in colour_matches if shape_match and m.start() < shape_match.start()]
    colour = (before[-1] if before else colour_matches[0]).group(1) if colour_matches else None
    size = re.search(rf"\b({_alternation(SIZES)})\b", t)
    position = next((name for name, phrase in sorted(WHERE.items(), key=lambda kv: -len(kv[1]))
                     if f" {phrase} " in t), None)
    if position is None:
        found = re.search(rf"\b(?:at|in|on) the ({_alternation(POSITIONS)})\b", t)
        position = found.group(1) if found else None
    motion = next((m for stem, m in MOTION_WORDS.items() if re.search(rf"\b{stem}", t)), None)
    direction = re.search(rf"\b{_DIRECTED} ({_alternation(DIRECTIONS)})\b", t)
    return Prompt(shape=shape_match.group(1) if shape_match else None, colour=colour, background=background,
                  size=size.group(1) if size else None, position=position, motion=motion,
                  direction=direction.group(1) if direction else None)


@dataclass(frozen=True)
class PromptSpec:
    """One evaluation prompt and what it asks for; `held_out`: its triple is in no training image."""

    text: str
    shape: str | None
    colour: str | None
    background: str | None
    motion: str | None = None
    held_out: bool = False

    @classmethod
    def from_text(cls, text: str, held_out: bool = False) -> "PromptSpec":
        p = parse_prompt(text)
        return cls(text, p.shape, p.colour, p.background, p.motion, held_out)


def world_config(world_dir: str | Path) -> WorldConfig:
    """The config a generated world was made with (its world.json), so prompts use its vocabulary. Its
    dicts come back in sorted key order (world.json is written sorted), which changes the world's random
    plan: take the folder's rows from `seen_combinations(cfg, world_dir)`, never a re-plan of this config."""
    meta = Path(world_dir) / "world.json"
    if not meta.is_file():
        raise FileNotFoundError(f"not a generated toy world: {meta} not found")
    return WorldConfig.model_validate(json.loads(meta.read_text())["config"])


def seen_combinations(world: WorldConfig, world_dir: str | Path | None = None) -> set[Triple]:
    """Triples of the world's LAION rows (every row, filtered ones too: stricter than 'trained on'),
    read from `<world_dir>/ground_truth.parquet`, else from the world's plan for this config (the same
    config writes the same rows, so no folder is needed)."""
    if world_dir is None:
        rows = plan_images(np.random.default_rng([world.seed, 0]), world)
        return {(r["shape"], r["colour"], r["background"]) for r in rows}
    path = Path(world_dir) / "ground_truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"not a generated toy world: {path} not found")
    table = pq.read_table(path, columns=["source", "shape", "colour", "background"]).to_pylist()
    return {(r["shape"], r["colour"], r["background"]) for r in table if r["source"] == "laion"}


def held_out_combinations(world: WorldConfig, world_dir: str | Path | None = None) -> set[Triple]:
    """Renderable triples that no LAION row of the world contains."""
    return set(renderable_triples(world)) - seen_combinations(world, world_dir)


def _draw(rng: np.random.Generator, pool: Sequence[Triple], n: int) -> list[Triple]:
    """n triples, without repeats while the pool lasts."""
    order: list[int] = []
    while len(order) < n:
        order += rng.permutation(len(pool)).tolist()
    return [pool[i] for i in order[:n]]


def _caption(rng: np.random.Generator, world: WorldConfig, triple: Triple, motion: str) -> str:
    """The world's own video caption template for this motion, with a direction the evaluator checks."""
    shape, colour, background = triple
    sizes = sorted(world.sizes, key=world.sizes.get)
    size = sizes[0] if motion == "grow" else sizes[int(rng.integers(len(sizes)))]
    directions = caption_directions(motion)
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    return fix_articles(VIDEO_TEMPLATES[motion].format(
        shape=shape, colour=colour, background=background, size=size, where=WHERE[position],
        direction=directions[int(rng.integers(len(directions)))]))


def prompt_set(world: WorldConfig, n_prompts: int = 8, seed: int = 0, held_out: Collection[Triple] | None = None,
               held_out_share: float = 0.5) -> list[PromptSpec]:
    """A fixed set of video prompts for `world`: the same arguments give the same list. About
    `held_out_share` of them use held-out triples (`held_out`, default: `held_out_combinations(world)`),
    as many as there are; motions cycle through the world's motions."""
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    scenes = renderable_triples(world)
    held = sorted(held_out_combinations(world) if held_out is None else {tuple(t) for t in held_out})
    unknown = [t for t in held if t[0] not in world.shapes or t[1] not in world.colours
               or t[2] not in world.backgrounds]
    if unknown:
        raise ValueError(f"held-out triples outside the world's vocabulary: {unknown[:3]}")
    seen = [t for t in scenes if t not in set(held)]
    n_held = n_prompts if not seen else min(len(held), round(n_prompts * held_out_share))
    rng = np.random.default_rng(seed)
    picks = [(t, True) for t in _draw(rng, held, n_held)] + [(t, False) for t in _draw(rng, seen, n_prompts - n_held)]
    specs = []
    for i, (triple, flag) in enumerate(picks):
        motion = world.motions[i % len(world.motions)]
        specs.append(PromptSpec(_caption(rng, world, triple, motion), *triple, motion=motion, held_out=flag))
    return specs


def evaluation_prompts(cfg: Any, world: str | None, n_prompts: int,
                       seed: int) -> tuple[WorldConfig, list[PromptSpec]]:
    """The world's config and its prompt set: from a generated world folder (its LAION rows define the
    held-out triples) or, without one, from the config's world plan."""
    world_cfg = world_config(world) if world else cfg.world
    held = held_out_combinations(world_cfg, world) if world else None
    return world_cfg, prompt_set(world_cfg, n_prompts, seed, held_out=held)
