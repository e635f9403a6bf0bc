"""Render a grid's records into tables, CSVs and a plot (and a README's block between its report markers).

    python benchmarks/report.py benchmarks/results/text_minilm --readme benchmarks/README.md
    python benchmarks/report.py benchmarks/results/speed --readme benchmarks/SPEED.md benchmarks/README.md

The harness itself is installed with peftlab (peftlab/harness/); this is `python -m peftlab.harness.report`.
"""

import sys

from peftlab.harness.report import main

if __name__ == "__main__":
    sys.exit(main())
