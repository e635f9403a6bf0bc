"""Label new texts or images with a run's output folder.

    peftlab predict RUN "a gripping, beautifully shot film" "dull"            # one JSON line per input
    peftlab predict RUN --file reviews.txt                                     # one input per line
    peftlab predict RUN --file reviews.csv --output predictions.csv            # a data set, in batches
    peftlab predict outputs/efficientnet_lite0_lora_animal_mnist cat.png dog.jpg
    peftlab predict outputs/minilm_multitask --task topic "stocks fell on Monday"  # a multi-task run: name the task

`--file` takes a plain text file (one input per line; image paths for an image run) or a data file (.csv, .jsonl,
.json, .parquet, read as the recipes read them): its input column is the run's `data.text_column` for a text run and
`image` (paths) for an image run, or `--column`; `--id-column` names the column that identifies each row (default:
the row number). Output: one JSON line per input ({"input", "label", "score", "probabilities"}), or with `--output`
a CSV with one row per input: id, label, score and one probability column per label name, written in one piece
(nothing half-written if labelling fails).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
from pathlib import Path

from peftlab.console import quiet_third_party
from peftlab.errors import PeftlabError
from peftlab.loading import load

DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")


def read_text_file(path: Path) -> str:
    """The content of a UTF-8 text file; one-line error for a binary file (an image, a zip) given as --file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise PeftlabError(f"--file {path} is not UTF-8 text ({err.reason} at byte {err.start}); give a text file "
                           f"with one input per line (image paths for an image run)") from err
    if "\0" in text:
        raise PeftlabError(f"--file {path} holds NUL bytes, so it is binary, not text; give a text file with one "
                           f"input per line")
    return text


def read_inputs_file(path: Path, column: str, id_column: str | None) -> tuple[list[str], list]:
    """(ids, inputs) of a --file: a data file's `column` (ids from `id_column` or the row number), or a plain text
    file's non-empty lines (ids: line numbers)."""
    if not path.is_file():
        raise PeftlabError(f"--file {path} does not exist")
    if path.suffix.lower() not in DATA_SUFFIXES:
        numbered = [(n, line) for n, line in enumerate(read_text_file(path).splitlines(), 1) if line.strip()]
        return [str(n) for n, _ in numbered], [line for _, line in numbered]
    from peftlab.data.text import read_data_file

    table = read_data_file(path)
    for option, name in (("--column", column), ("--id-column", id_column)):
        if name is not None and name not in table.column_names:
            raise PeftlabError(f"{path} has no column {name!r} ({option}); its columns are "
                               f"{', '.join(table.column_names)}")
    ids = [str(v) for v in table[id_column]] if id_column else [str(i) for i in range(len(table))]
    return ids, list(table[column])


def write_predictions_csv(path: Path, ids: list[str], results: list[dict], label_names: list[str]) -> None:
    """One row per input (id, label, score, a probability column per label), replacing `path` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "label", "score", *(f"p_{name}" for name in label_names)])
        for row_id, result in zip(ids, results):
            writer.writerow([row_id, result["label"], result["score"],
                             *(result["probabilities"][name] for name in label_names)])
    os.replace(handle.name, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peftlab predict", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("run_dir", help="a run's output_dir")
    parser.add_argument("inputs", nargs="*", help="texts, or image files for an image run")
    parser.add_argument("--file", help="a text file with one input per line, or a .csv/.jsonl/.json/.parquet file")
    parser.add_argument("--column", help="a data file's input column (default: the run's data.text_column, or "
                                         "`image` for an image run)")
    parser.add_argument("--id-column", help="a data file's id column (default: the row number)")
    parser.add_argument("--output", help="write a CSV (id, label, score, p_<label>...) instead of JSON lines")
    parser.add_argument("--task", help="a multi-task run's task to label the inputs for (its README lists them)")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward pass (default: 64)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and third-party notices")
    args = parser.parse_intermixed_args(argv)  # inputs may come before or after the options (--task after RUN)
    quiet_third_party(args.debug)  # also when run as `python -m peftlab.<command>`, not through `peftlab`
    try:
        if args.batch_size < 1:
            raise PeftlabError(f"--batch-size must be at least 1, got {args.batch_size}")
        if args.output and Path(args.output).is_dir():
            raise PeftlabError(f"--output {args.output} is a folder; give a file path such as predictions.csv")
        if not args.inputs and not args.file:
            raise PeftlabError("nothing to label: pass texts/image paths or --file")
        run = load(args.run_dir)
        tasks = getattr(run, "task_labels", None)  # a multi-task run's tasks and their label names
        if tasks is None and args.task is not None:
            raise PeftlabError(f"--task applies to multi-task runs, and {args.run_dir} has one task; drop --task")
        if tasks is not None and args.task is None:
            raise PeftlabError(f"{args.run_dir} is a multi-task run: pass --task, one of {', '.join(tasks)}")
        if tasks is not None and args.task not in tasks:
            raise PeftlabError(f"unknown task {args.task!r} (--task); this run's tasks are {', '.join(tasks)}")
        label_names = tasks[args.task] if tasks is not None else run.label_names
        options = {"task": args.task} if tasks is not None else {}
        ids, inputs = [str(i) for i in range(len(args.inputs))], list(args.inputs)
        if args.file:
            data = {task.name: task.data for task in run.cfg.multitask.tasks}.get(args.task, run.cfg.data)
            column = args.column or (data.text_column if run.task == "text" else "image")
            file_ids, file_inputs = read_inputs_file(Path(args.file), column, args.id_column)
            ids, inputs = ids + file_ids, inputs + file_inputs
        if not inputs:
            raise PeftlabError(f"nothing to label: --file {args.file} holds no inputs")
        results = run.predict(inputs, batch_size=args.batch_size, progress=True, **options)
        if args.output:
            write_predictions_csv(Path(args.output), ids, results, label_names)
            print(f"labelled {len(results)} inputs -> {args.output}", file=sys.stderr)
        else:
            for result in results:
                print(json.dumps(result))
    except PeftlabError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
