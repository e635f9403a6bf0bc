"""One evaluation pass of the text recipe's model over real texts, batched in file order or longest first: its time
and the process's peak memory (benchmarks/SPEED.md, "Evaluation in length order").

    python benchmarks/data/reuters_r52.py benchmarks/data/r52      # the long texts (see that script)
    for order in file length file length; do
        OMP_NUM_THREADS=1 nice -n 5 python benchmarks/eval_order.py --order $order --data benchmarks/data/r52 \
            --texts 400 --max-length 416
    done

One side per invocation, so each process's max RSS is its own; alternate the sides and compare pairs. What it runs:
the default recipe's model (packaged MiniLM, LoRA r=8, mean pooling, the new head seeded; untrained: the work does
not depend on the weights) under `build_accelerator` (`--precision auto`: bf16 autocast on a CPU with AVX512-BF16;
`no`: fp32), the first `--texts` texts of the data's test split tokenized to `--max-length`, and
`peftlab.training.evaluate` over the recipe's evaluation loader (`make_text_dataloader`, batch 64) with
`group_by_length` false (file order) or true (longest first). Prints one JSON line: seconds of each pass, padded
tokens per pass, real tokens, peak RSS before and after evaluating, and a digest of the predictions;
--save-probabilities keeps the probabilities, in split order, to compare the sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np
import torch
from accelerate.utils import set_seed
from datasets import DatasetDict

from peftlab import apply_strategy
from peftlab.backbones import load_base
from peftlab.config import ModelConfig, TrainConfig
from peftlab.data import load_text_dataset, make_text_dataloader, tokenize_dataset
from peftlab.training import build_accelerator, evaluate, peak_memory_mb


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--order", choices=("file", "length"), required=True)
    parser.add_argument("--data", default="rotten_tomatoes", help="a packaged name or a data folder (its test split)")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64, help="the recipe's train.eval_batch_size")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--precision", choices=("auto", "no"), default="auto",
                        help="train.mixed_precision: auto (bf16 autocast where the CPU has it) or no (fp32)")
    parser.add_argument("--save-probabilities", metavar="NPY", help="also save the probabilities (to compare sides)")
    args = parser.parse_args(argv)

    data = load_text_dataset(args.data)
    split = data.splits["test"].select(range(min(args.texts, len(data.splits["test"]))))
    accelerator = build_accelerator(TrainConfig(mixed_precision=args.precision, trackers=[], cpu_threads=None), "/tmp")
    set_seed(0)  # the new head's initial weights: the same model on both sides
    backbone = load_base(ModelConfig(name="minilm"), task="text", label_names=data.label_names)
    model = apply_strategy(backbone.model, "lora", pooling="mean", r=8)
    tokenized = tokenize_dataset(DatasetDict({"test": split}), backbone.tokenizer, args.max_length)["test"]
    loader = make_text_dataloader(tokenized, backbone.tokenizer, args.batch_size, shuffle=False,
                                  group_by_length=args.order == "length", seed=0)
    padded = sum(batch["input_ids"].numel() for batch in loader)
    real = sum(len(ids) for ids in tokenized["input_ids"])
    model, loader = accelerator.prepare(model, loader)
    before_mb = peak_memory_mb(accelerator.device)
    seconds, outputs = [], None
    for _ in range(args.passes):
        start = time.perf_counter()
        outputs = evaluate(model, loader, accelerator, lambda predictions, references: {})
        seconds.append(round(time.perf_counter() - start, 2))
    digest = hashlib.sha256(outputs.predictions.tobytes()).hexdigest()[:12]
    result = {"order": args.order, "data": args.data, "texts": len(split), "max_length": args.max_length,
              "threads": torch.get_num_threads(), "precision": accelerator.mixed_precision, "eval_s": seconds,
              "padded_tokens": padded, "real_tokens": real, "peak_rss_mb_before": round(before_mb),
              "peak_rss_mb": round(peak_memory_mb(accelerator.device)), "predictions_sha256": digest,
              "load_average": [round(x, 2) for x in os.getloadavg()]}
    if args.save_probabilities:
        np.save(args.save_probabilities, outputs.probabilities)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
