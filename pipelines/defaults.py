"""Generation defaults that the library and the `mav` command line share. Torch-free, so that `mav --help`
can offer them without loading the cascade."""
from __future__ import annotations

STAGES = ("prior", "temporal", "interpolation", "sr_low", "sr_high")  # = model.cascade.STAGE_ORDER (tested)
DEFAULT_FPS = 8.0  # frame rate of the base clip (Dt's) when a caller names none
