"""`python -m pipelines.cli`: the same as `mav`."""
import sys

from pipelines.cli import main

sys.exit(main())
