"""Load benchmark of `peftlab serve`: N concurrent clients send a fixed count of requests over loopback.

    python recipes/text_classification.py output_dir=runs/serve_text data.max_train_samples=2000 train.epochs=1
    python benchmarks/serve_load.py runs/serve_text --clients 1 8 32 --requests 200 --modes off 0 5 --threads 1
    python benchmarks/serve_load.py runs/serve_text --threads 1 --forward    # ms per text at batch 1, 8, 32, no HTTP
    python benchmarks/serve_load.py --report           # benchmarks/SERVE.md's table, from the records alone
    python benchmarks/serve_load.py --memory benchmarks/results/multitask_text --seed 0   # serving memory per run

For each round and each batching mode (`off`: --no-batching; a number N: batching with --batch-wait-ms N, 0 joining
only the requests that queued while the model ran) the server is started afresh
(`peftlab.serve.server_process`), warmed up with a few requests, then for each client count that many coroutines of one
httpx.AsyncClient send `--requests` POST /predict requests in all, each one text from the Rotten Tomatoes test split
(one input per request: the on-line case that batching is for). Rounds alternate the order of the modes, so a
change in the machine's load hits all alike. One JSON record per (mode, clients, round) in
benchmarks/results/serve_load/: requests/s, latency p50/p99 in ms, the load average, CPU, versions and git commit.
The client runs on the same cores as the server.

`--memory RESULTS` (issue 19): for each finished cell of one seed in a multi-task grid's records folder, `peftlab
serve` is started on its run folder alone, sent one text per task, and its resident memory read from
/proc/<pid>/status (VmRSS now, VmHWM the peak); `serving_memory.json` in that folder, which the grid's report turns
into the serving-memory column (all tasks in one process against one process per task).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load"
PAGE = ROOT / "benchmarks" / "SERVE.md"
BEGIN, END = "<!-- serve_load table: begin -->", "<!-- serve_load table: end -->"


async def load(url: str, texts: list[str], clients: int, requests: int) -> dict:
    """`clients` concurrent senders share `requests` requests of one text each; throughput and latency."""
    import httpx

    latencies, failures, counter = [], 0, iter(range(requests))

    async def client_loop(client):
        nonlocal failures
        for i in counter:  # a shared iterator: each request is sent by whichever client is free
            start = time.perf_counter()
            response = await client.post("/predict", json={"inputs": [texts[i % len(texts)]]})
            latencies.append(time.perf_counter() - start)
            failures += response.status_code != 200

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        elapsed = time.perf_counter() - start
    ms = sorted(1000 * x for x in latencies)
    return {"requests": requests, "clients": clients, "failures": failures, "seconds": round(elapsed, 3),
            "requests_per_s": round(requests / elapsed, 2), "p50_ms": round(percentile(ms, 50), 1),
            "p99_ms": round(percentile(ms, 99), 1), "mean_ms": round(statistics.fmean(ms), 1)}


def percentile(sorted_values: list[float], q: float) -> float:
    """The q-th percentile by linear interpolation (numpy's default)."""
    position = (len(sorted_values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def server_threads(output: str) -> int | None:
    """The thread count the server printed at start-up (`...; 2 cpu threads (...)`)."""
    match = re.search(r"(\d+) cpu threads", output)
    return int(match.group(1)) if match else None


def test_texts() -> list[str]:
    from peftlab.data.text import load_text_dataset

    return list(load_text_dataset("rotten_tomatoes").splits["test"]["text"])


def forward_cost(run: str, texts: list[str], threads: int | None, batch_sizes=(1, 8, 32), repeats: int = 5) -> dict:
    """In-process, without HTTP: ms per text of one forward pass at each batch size (best of `repeats`), which
    bounds what batching can gain: when the cost per text hardly falls with the batch, joining requests cannot help."""
    import torch

    from peftlab.serve import load_model
    from peftlab.threads import set_cpu_threads

    set_cpu_threads(threads)
    model = load_model(run).model
    model.probabilities(texts[:8])  # warm-up
    per_text = {}
    for size in batch_sizes:
        best = float("inf")
        for repeat in range(repeats):
            batch = texts[repeat * size:(repeat + 1) * size]
            start = time.perf_counter()
            model.probabilities(batch)
            best = min(best, (time.perf_counter() - start) / size)
        per_text[str(size)] = round(1000 * best, 2)
    return {"ms_per_text": per_text, "threads": torch.get_num_threads()}


def measure(args) -> None:
    from peftlab.harness.provenance import environment, git_state
    from peftlab.serve import server_process

    texts = test_texts()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.forward:
        record = {"run": str(args.run), **forward_cost(args.run, texts, args.threads),
                  "load_average_1m": round(os.getloadavg()[0], 2), "command": " ".join(sys.argv),
                  "environment": environment(), "git": git_state()}
        (RESULTS / "forward.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"forward pass, ms per text by batch size: {record['ms_per_text']} ({record['threads']} threads)")
        return
    for round_index in range(args.rounds):
        modes = args.modes if round_index % 2 == 0 else list(reversed(args.modes))
        for mode in modes:
            server_args = ["--no-access-log", "--max-connections", str(max(args.clients) + 8),
                           *(["--no-batching"] if mode == "off" else ["--batch-wait-ms", mode])]
            if args.threads:
                server_args += ["--threads", str(args.threads)]
            with server_process(args.run, *server_args) as server:
                asyncio.run(load(server.url, texts, 4, 20))  # warm-up: first calls allocate
                for clients in args.clients:
                    result = asyncio.run(load(server.url, texts, clients, args.requests))
                    record = {"run": str(args.run), "batching": mode, "round": round_index, **result,
                              "load_average_1m": round(os.getloadavg()[0], 2),
                              "server_threads": server_threads(server.output()), "command": " ".join(sys.argv),
                              "environment": environment(), "git": git_state()}
                    name = f"batching-{mode}-clients{clients}-round{round_index}.json"
                    (RESULTS / name).write_text(json.dumps(record, indent=2) + "\n")
                    print(f"batching={mode} clients={clients:>3} round={round_index}: "
                          f"{result['requests_per_s']:7.1f} req/s, p50 {result['p50_ms']:7.1f} ms, "
                          f"p99 {result['p99_ms']:7.1f} ms, failures {result['failures']} "
                          f"(load {record['load_average_1m']})", flush=True)


def report() -> str:
    """The Markdown table of the records: per batching mode and client count, the median over rounds."""
    records = [json.loads(path.read_text()) for path in sorted(RESULTS.glob("batching-*.json"))]
    if not records:
        raise SystemExit(f"no records in {RESULTS}; run the benchmark first")
    cells: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        cells.setdefault((record["batching"], record["clients"]), []).append(record)
    baseline = {clients: statistics.median(r["requests_per_s"] for r in group)
                for (mode, clients), group in cells.items() if mode == "off"}
    names = {"off": "off (--no-batching)", "0": "on (the default)"}
    lines = ["| batching | clients | requests/s | vs no batching | p50 latency (ms) | p99 latency (ms) | rounds | "
             "load average |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    order = {mode: i for i, mode in enumerate(["off", "0"])}
    for (mode, clients), group in sorted(cells.items(), key=lambda c: (c[0][1], order.get(c[0][0], 2), c[0][0])):
        rps = statistics.median(r["requests_per_s"] for r in group)
        ratio = f"{rps / baseline[clients]:.2f}x" if clients in baseline else "-"
        loads = sorted(r["load_average_1m"] for r in group)
        lines.append(f"| {names.get(mode, f'on, --batch-wait-ms {mode}')} | {clients} | {rps:.1f} | {ratio} | "
                     f"{statistics.median(r['p50_ms'] for r in group):.0f} | "
                     f"{statistics.median(r['p99_ms'] for r in group):.0f} | {len(group)} | "
                     f"{loads[0]:g}-{loads[-1]:g} |")
    first = records[0]
    lines += ["", f"{first['requests']} requests of one text per cell; medians over rounds. "
              f"{first['environment']['device']}; torch {first['environment']['versions']['torch']}, "
              f"server cpu threads: {first['server_threads']}; git {str(first['git']['sha'])[:7]}. "
              f"Command: `{first['command']}`"]
    if (RESULTS / "forward.json").is_file():
        forward = json.loads((RESULTS / "forward.json").read_text())
        costs = ", ".join(f"{ms:g} ms at batch {size}" for size, ms in forward["ms_per_text"].items())
        lines += ["", f"One forward pass in-process (cpu threads: {forward['threads']}; no HTTP), per text: {costs} "
                  f"(load average {forward['load_average_1m']:g}). Command: `{forward['command']}`"]
    return "\n".join(lines)


def process_memory_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process in MB: {"rss_mb": VmRSS, "peak_rss_mb": VmHWM} (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
            "peak_rss_mb": round(int(fields["VmHWM"].split()[0]) / 1024, 1)}


def serving_memory(results_dir: Path, seed: int, threads: int | None) -> dict:
    """Serve each finished multi-task cell of `seed` in `results_dir` alone, one text per task, and record the server
    process's memory; writes and returns SERVING_MEMORY_FILE's content."""
    import httpx

    from peftlab.harness.multitask_report import SERVING_MEMORY_FILE
    from peftlab.harness.provenance import environment, git_state
    from peftlab.harness.report import load_records
    from peftlab.serve import server_process

    records = [r for r in load_records(results_dir) if r["status"] == "ok" and r["seed"] == seed and "tasks" in r]
    if not records:
        raise SystemExit(f"no finished multi-task cells of seed {seed} in {results_dir}; run the grid first")
    text = test_texts()[0]
    rows = []
    for record in sorted(records, key=lambda r: r["cell"]):
        run_dir = ROOT / record["run_dir"]
        server_args = ["--no-access-log", *(["--threads", str(threads)] if threads else [])]
        with server_process(run_dir, *server_args) as server:
            for task in record["tasks"]:
                response = httpx.post(server.url + "/predict", json={"inputs": [text], "task": task}, timeout=300)
                response.raise_for_status()
            memory = process_memory_mb(server.process.pid)
        rows.append({"cell": record["cell"], "tasks": list(record["tasks"]), **memory})
        print(f"{record['cell']}: {len(record['tasks'])} task(s), RSS {memory['rss_mb']:.0f} MB "
              f"(peak {memory['peak_rss_mb']:.0f} MB)", flush=True)
    result = {"seed": seed, "rows": rows,
              "note": "one `peftlab serve` process per run, measured one after another, "
                      + (f"{threads} thread{'s' if threads != 1 else ''}" if threads else "the default threads"),
              "load_average_1m": round(os.getloadavg()[0], 2), "command": " ".join(sys.argv),
              "environment": environment(), "git": git_state()}
    (Path(results_dir) / SERVING_MEMORY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", help="the run folder to serve (the default text run)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="requests per (window, clients) cell")
    parser.add_argument("--modes", nargs="+", default=["off", "0", "5"],
                        help="batching modes: off, or the server's --batch-wait-ms")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own rule)")
    parser.add_argument("--forward", action="store_true",
                        help="instead: time the forward pass in-process at batch 1, 8, 32 (forward.json)")
    parser.add_argument("--report", action="store_true", help=f"write the table into {PAGE.name} and print it")
    parser.add_argument("--memory", type=Path, metavar="RESULTS",
                        help="instead: the serving memory of each multi-task cell of --seed in this records folder")
    parser.add_argument("--seed", type=int, default=0, help="with --memory: the seed whose runs to serve")
    args = parser.parse_args(argv)
    if args.memory:
        serving_memory(args.memory, args.seed, args.threads)
        return
    if args.report:
        table = report()
        text = PAGE.read_text()
        PAGE.write_text(text[:text.index(BEGIN) + len(BEGIN)] + "\n" + table + "\n" + text[text.index(END):])
        print(table)
        return
    if not args.run:
        parser.error("give the run folder to serve, or --report")
    measure(args)


if __name__ == "__main__":
    main()
