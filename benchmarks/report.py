"""Render a grid's records into a Markdown table (LoRA-paper style), CSVs and a plot of accuracy vs parameters.

    python benchmarks/report.py benchmarks/results/text_minilm
    python benchmarks/report.py benchmarks/results/text_minilm --readme benchmarks/README.md   # also refresh README
    python benchmarks/report.py benchmarks/results/glue_roberta_base --split validation       # dev-set protocol
    python benchmarks/report.py benchmarks/results/text_minilm --compare runs/rerun/records    # re-runs reproduce?

Writes table.md, summary.csv, cells.csv and <metric>_vs_params.png beside the records (or under --out), from the
JSON records alone; --readme replaces the README block between `<!-- report:<grid> -->` and `<!-- /report:<grid> -->`.
--compare takes a folder of re-run cells (`run.py <grid> --only <cell> --results <folder>`), prints each beside its
committed record and exits 1 unless every re-run lies within its row's spread over seeds; it writes nothing.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from harness.report import (METRICS, SPLITS, compare_reruns, load_records, markdown_report, relative_link, render,
                            summarize, update_readme)
from peftlab.errors import PeftlabError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a grid's records folder, e.g. benchmarks/results/smoke")
    parser.add_argument("--out", type=Path, help="where to write the table, CSVs and plot (default: the records folder)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="which split's metrics to tabulate")
    parser.add_argument("--metric", choices=tuple(METRICS), default="accuracy")
    parser.add_argument("--readme", type=Path, help="also replace this grid's block in a README")
    parser.add_argument("--compare", type=Path, metavar="RERUNS",
                        help="a folder of re-run cells: check each against its committed record, write nothing")
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/report.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.compare:
            table, reproduced = compare_reruns(summarize(load_records(args.results)), load_records(args.compare),
                                               args.split, args.metric)
            print(table)
            return 0 if reproduced else 1
        summary, paths = render(args.results, args.out, split=args.split, metric=args.metric, command=command)
        if args.readme:
            block = markdown_report(summary, args.split, args.metric, plot_link=relative_link(paths["plot"], args.readme.parent))
            update_readme(args.readme, summary.grid, block)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(paths["table"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()) + (f", {args.readme}" if args.readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
