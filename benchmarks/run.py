"""Run a benchmark grid: one subprocess per cell, one JSON record per cell; cells with a record are skipped.

    python benchmarks/run.py benchmarks/grids/text_minilm.yaml                 # fill in the missing cells
    python benchmarks/run.py benchmarks/grids/text_minilm.yaml --list          # cells, commands and status
    python benchmarks/run.py benchmarks/grids/text_minilm.yaml --only '*lora-r8*seed0'

The harness itself is installed with peftlab (peftlab/harness/); this is `python -m peftlab.harness.runner`.
"""

import sys

from peftlab.harness.runner import main

if __name__ == "__main__":
    sys.exit(main())
