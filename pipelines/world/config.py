"""What the toy world contains: its vocabulary, its sizes, its share of bad rows, and the presets.

Every metadata row of the world ends in exactly one expected outcome; the ground truth names it, so
a pipeline run can be scored row by row (`CATEGORIES` says each in full, world.json repeats them):
    ok          valid; kept (also the rows served through /redirect)
    nsfw, watermark, toxic, too_small     removed by the metadata filters (LAION only)
    http_404, corrupt, html, slow         failed by the downloader (html: WebVid only)
    bad_span    an HD-VILA clip whose span ends before it starts or lies past the video's end
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from model.config import ConfigBase

WORLD_VERSION = 2

# The tokens a toxic-word filter must catch; the world puts one into the TEXT of each "toxic" row
# and never into any other caption.
TOXIC_SAMPLE = ("xxx", "nsfw", "porn", "nude")

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
MOTIONS = ("drift", "bounce", "grow", "pan")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "blue": (40, 80, 220),
    "green": (40, 170, 60),
}
# Half-extent of a shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.09, "medium": 0.14, "large": 0.19}
# 3x3 grid of named positions: name -> centre as fractions of the side (x right, y down).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.22, 0.22), "top": (0.5, 0.22), "top right": (0.78, 0.22),
    "left": (0.22, 0.5), "center": (0.5, 0.5), "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78), "bottom": (0.5, 0.78), "bottom right": (0.78, 0.78),
}

CATEGORIES: dict[str, str] = {
    "ok": "a valid sample; the pipeline keeps it (redirect rows too: the downloader follows a 302)",
    "nsfw": "punsafe >= 0.9 (ok rows: < 0.1 or null); an NSFW filter removes it",
    "watermark": "pwatermark >= 0.8 (ok rows: < 0.3 or null); the paper's pwatermark > 0.5 filter removes it",
    "toxic": "TEXT contains one word of TOXIC_SAMPLE; a toxic-word filter removes it",
    "too_small": "a real 4x4 px jpeg, WIDTH/HEIGHT say so; any minimum size >= 8 removes it",
    "http_404": "the file was never written; the server answers 404",
    "corrupt": "a truncated file: a jpeg cut inside its headers, an mp4 cut before its moov atom",
    "html": "an HTML page stored as .mp4 and served as text/html",
    "slow": "served under /slow/, after `slow_seconds`; a downloader timeout below that fails it",
    "bad_span": "HD-VILA clip whose span ends before it starts or lies past the video's end",
}
# Where in a pipeline each category is decided.
CATEGORY_STAGE: dict[str, str] = {
    "ok": "", "nsfw": "filter", "watermark": "filter", "toxic": "filter", "too_small": "filter",
    "http_404": "download", "corrupt": "download", "html": "download", "slow": "download",
    "bad_span": "clip",
}
LAION_BAD = ("nsfw", "watermark", "toxic", "too_small", "http_404", "corrupt", "slow")
WEBVID_BAD = ("http_404", "corrupt", "html", "slow")
HDVILA_BAD = ("http_404",)  # video-level; every clip of such a video expects it
SPAN_DEFECTS = ("end_before_start", "past_end")  # clip-level, category "bad_span"


class WorldConfig(ConfigBase):
    """The toy world: LAION-style captioned images, WebVid- and HD-VILA-style unlabeled videos."""

    seed: int = 0
    n_images: int = Field(40, ge=1, description="rows of laion.parquet, bad rows included")
    n_videos: int = Field(8, ge=1, description="rows of webvid.csv, bad rows included")
    n_hdvila_videos: int = Field(3, ge=1, description="rows of hdvila.jsonl")
    clips_per_video: int = Field(2, ge=1, description="HD-VILA clips per video")
    image_size: int = Field(64, ge=16, description="side of the (square) images, px")
    too_small_size: int = Field(4, ge=1, le=7, description="side of the too_small images, px")
    video_size: int = Field(64, ge=16, description="side of the (square) videos, px; even")
    video_fps: int = Field(24, ge=1, le=60)
    video_seconds: tuple[int, int] = Field((4, 5), description="min, max whole-second duration")
    gop: int | None = Field(None, ge=1, description="keyframe interval; None: fps // 2")
    shapes: tuple[str, ...] = SHAPES
    colours: dict[str, tuple[int, int, int]] = Field(default_factory=lambda: dict(COLOURS))
    backgrounds: dict[str, tuple[int, int, int]] = Field(default_factory=lambda: dict(BACKGROUNDS))
    sizes: dict[str, float] = Field(default_factory=lambda: dict(SIZES))
    motions: tuple[str, ...] = MOTIONS
    travel: tuple[float, float] = Field((0.2, 0.45), description=(
        "min, max distance a drift or pan covers over its video, fractions of the side"))
    grow_to: float = Field(1.0, ge=1.0, le=2.0, description=(
        "a growing shape ends at this multiple of the largest size"))
    held_out: int = Field(0, ge=0, description="(shape, colour, background) triples no LAION row shows")
    motion_caption_share: float = Field(0.0, ge=0.0, le=1.0, description=(
        "share of LAION captions phrased as a video caption naming a motion the still cannot show"))
    bad_share: float = Field(0.1, ge=0.0, le=0.5, description="share of each source's rows that are bad")
    slow_rows: int = Field(1, ge=0, description="slow rows per source (each costs a downloader timeout)")
    redirect_rows: int = Field(1, ge=0, description="ok rows served through /redirect, per source")
    null_share: float = Field(0.1, ge=0.0, le=1.0, description="share of punsafe/pwatermark left null")
    slow_seconds: float = Field(6.0, gt=0, description="how long /slow/ waits; keep downloader timeouts below")
    jpeg_quality: int = Field(90, ge=1, le=100)
    crf: int = Field(20, ge=0, le=51, description="x264 quality")
    workers: int | None = Field(None, ge=1, description="render threads; None: the machine's cores")
    base_url: str = "http://127.0.0.1:8765"
    # Curation defects (pipelines/world/defects.py), shares of the valid rows; 0 leaves a world without them.
    overlay_share: float = Field(0.0, ge=0.0, le=0.5, description="WebVid videos under a static text logo")
    still_share: float = Field(0.0, ge=0.0, le=0.5, description="WebVid videos that hold their first frame")
    cut_share: float = Field(0.0, ge=0.0, le=0.5, description="WebVid videos that cut to a second scene")
    duplicate_share: float = Field(0.0, ge=0.0, le=0.3, description=(
        "WebVid videos and LAION images that near-duplicate an earlier row"))

    @field_validator("shapes")
    @classmethod
    def _known_shapes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(SHAPES))
        if unknown or not v:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}; unknown: {unknown}")
        return v

    @field_validator("motions")
    @classmethod
    def _known_motions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - set(MOTIONS))
        if unknown or not v:
            raise ValueError(f"motions must be a non-empty subset of {MOTIONS}; unknown: {unknown}")
        return v

    @field_validator("base_url")
    @classmethod
    def _plain_base(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or v.endswith("/"):
            raise ValueError(f"base_url must be http(s)://host[:port] without a trailing slash, got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "WorldConfig":
        if self.video_size % 2:
            raise ValueError(f"video_size must be even (yuv420p), got {self.video_size}")
        lo, hi = self.video_seconds
        if not 3 <= lo <= hi:
            raise ValueError(f"video_seconds must satisfy 3 <= min <= max, got {self.video_seconds}")
        if not 0 < self.travel[0] <= self.travel[1] <= 0.9:
            raise ValueError(f"travel must satisfy 0 < min <= max <= 0.9, got {self.travel}")
        if not self.colours or not self.backgrounds or not self.sizes:
            raise ValueError("colours, backgrounds and sizes must not be empty")
        if self.cut_share > 0 and len(self.backgrounds) < 2:
            raise ValueError("cut_share > 0 needs two backgrounds at least: a cut switches to another one")
        if not all(0.03 <= s <= 0.2 for s in self.sizes.values()):
            raise ValueError(f"sizes are half-extents in 0.03..0.2 of the side, got {self.sizes}")
        for source, n, bad in (("laion", self.n_images, LAION_BAD), ("webvid", self.n_videos, WEBVID_BAD)):
            need = bad_rows(self, n, bad) + self.redirect_rows + 1
            if n < need:
                raise ValueError(f"{source}: {n} rows cannot hold its bad and redirect rows plus one ok row ({need})")
        ok_videos = self.n_hdvila_videos - bad_rows(self, self.n_hdvila_videos, HDVILA_BAD)
        if ok_videos * self.clips_per_video < len(SPAN_DEFECTS) + 1:
            raise ValueError("hdvila: too few videos or clips to hold one clip of each bad span and one ok clip")
        return self

    @property
    def has_defects(self) -> bool:
        return any(s > 0 for s in (self.overlay_share, self.still_share, self.cut_share, self.duplicate_share))

    @property
    def keyframe_interval(self) -> int:
        return self.gop or max(1, self.video_fps // 2)


def bad_count(config: WorldConfig, n: int, categories: tuple[str, ...], category: str) -> int:
    """Rows of one bad category in a source of `n` rows: its share, at least one; slow is fixed."""
    if category == "slow":
        return config.slow_rows
    return max(1, round(config.bad_share * n / len(categories)))


def bad_rows(config: WorldConfig, n: int, categories: tuple[str, ...]) -> int:
    return sum(bad_count(config, n, categories, c) for c in categories)


def _tiny() -> WorldConfig:
    return WorldConfig()


def _toy() -> WorldConfig:
    # Images at 128 px serve sr_high of the toy cascade (128); videos at 128 px.
    # Motion that shows in the second that Dt samples (8 frames at 8 fps): 3-4 s videos, travel 0.35-0.5 and
    # growth to 1.6x, so every such window of the world's own videos moves (docs/TOY_WORLD.md).
    # Shapes larger than the tiny world's, so that at the 32 px base resolution of the toy cascade even a
    # small one spans ~8 px and its outline (circle, square, triangle, diamond, cross) can be drawn.
    # 12 of the 140 drawable (shape, colour, background) triples never appear in a caption (held out).
    # A quarter of the alt-text names a motion, as real alt-text of video stills and action photos does, so
    # the text encoder has met "drifting", "bouncing" or "pans" before the evaluation's video captions.
    # 9000 images: more company for each colour, shape and background, which held-out triples need.
    return WorldConfig(n_images=9000, n_videos=200, n_hdvila_videos=40, clips_per_video=3,
                       image_size=128, video_size=128, video_seconds=(3, 4), travel=(0.35, 0.5), grow_to=1.6,
                       bad_share=0.05, slow_rows=2,
                       sizes={"small": 0.13, "medium": 0.16, "large": 0.19}, held_out=12,
                       motion_caption_share=0.25)


def _paper() -> WorldConfig:
    # The paper's resolutions (768 px images for sr_high, 256 px video for sr_low); metadata defaults only.
    return WorldConfig.model_validate({**_toy().model_dump(), "n_images": 100_000, "n_videos": 10_000,
                                       "n_hdvila_videos": 2_000, "image_size": 768, "video_size": 256,
                                       "video_seconds": (8, 20)})


def _defects() -> WorldConfig:
    # The tiny world's vocabulary with every curation defect on, at 96 px so the logo's letters are legible;
    # enough videos that each defect has a dozen or so rows to score a curation stage against.
    return WorldConfig(n_images=80, n_videos=100, video_size=96, video_seconds=(3, 4), bad_share=0.05,
                       overlay_share=0.2, still_share=0.12, cut_share=0.12, duplicate_share=0.1)


WORLD_PRESETS = {"tiny": _tiny, "toy": _toy, "paper": _paper, "paper-cpu": _tiny, "defects": _defects}  # paper-cpu: CPU-sized data


def world_preset(name: str) -> WorldConfig:
    if name not in WORLD_PRESETS:
        raise ValueError(f"unknown world preset {name!r}; choose one of {sorted(WORLD_PRESETS)}")
    return WORLD_PRESETS[name]()
