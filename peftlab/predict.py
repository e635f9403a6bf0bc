"""Label new texts or images with a run's output folder.

    peftlab predict outputs/minilm_lora_rotten_tomatoes "a gripping, beautifully shot film" "dull"
    peftlab predict outputs/minilm_lora_rotten_tomatoes --file reviews.txt     # one text per line
    peftlab predict outputs/efficientnet_lite0_lora_animal_mnist cat.png dog.jpg

Prints one JSON line per input: {"input": ..., "label": ..., "score": ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from peftlab.errors import PeftlabError
from peftlab.loading import load


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="peftlab predict", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run's output_dir")
    parser.add_argument("inputs", nargs="*", help="texts, or image files for an image run")
    parser.add_argument("--file", help="a text file with one input per line")
    args = parser.parse_args(argv)
    try:
        inputs = list(args.inputs)
        if args.file:
            path = Path(args.file)
            if not path.is_file():
                raise PeftlabError(f"--file {path} does not exist")
            inputs += [line for line in read_text_file(path).splitlines() if line.strip()]
        if not inputs:
            raise PeftlabError("nothing to label: pass texts/image paths or --file")
        for result in load(args.run_dir).predict(inputs):
            print(json.dumps(result))
    except PeftlabError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
