#!/usr/bin/env python3
"""Concurrency benchmark of `wgllm serve`: 1, 2, 4 and 8 concurrent streams of chat requests,
aggregate generated tokens/s and time to first token, as a Markdown table (BENCHMARKS.md).

    python3 benches/serve.py [--url http://127.0.0.1:8080/v1] [--streams 1,2,4,8] [-n 32]

Without --url it starts `target/release/wgllm serve --parallel MAX -c 512` on a free port (and
stops it after). Each stream sends --requests streaming chat requests one after another, each
generating exactly -n tokens (`ignore_eos`), with a prompt of its own; a warm-up request first
compiles the prefill kernels (the server compiles the batched decode's when it starts, unless
--server-arg=--no-warm-up). Only the Python standard library is used.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

TOPICS = ["the sea", "a mountain", "autumn", "a city at night", "a library", "the desert",
          "a train journey", "the first snow"]


def stream_chat(base, i, n, key, tag):
    """One streaming chat request: (time to first token, tokens generated, seconds). `tag` makes
    the prompt unique, so that no level finds its prompts cached by an earlier one."""
    content = f"Write a short story about {TOPICS[i % 8]} ({tag})."
    body = json.dumps({
        "messages": [{"role": "user", "content": content}],
        "max_tokens": n, "temperature": 0, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True},
    }).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(f"{base}/chat/completions", body, headers)
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    with urllib.request.urlopen(req, timeout=3600) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if ttft is None and c["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    return ttft or 0.0, tokens, time.perf_counter() - t0


def level(base, streams, n, requests, key):
    results = []
    lock = threading.Lock()

    def worker(s):
        for r in range(requests):
            out = stream_chat(base, s * requests + r, n, key, f"{streams}.{s}.{r}")
            with lock:
                results.append(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r[1] for r in results)
    ttfts = [r[0] for r in results]
    return tokens, wall, statistics.median(ttfts), max(ttfts)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="the server's /v1 URL (default: start one)")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("-n", type=int, default=32, help="tokens per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default=None, help="-m for the server this script starts")
    ap.add_argument("--server-arg", action="append", default=[],
                    help="one more argument for the server this script starts "
                         "(repeat; e.g. --server-arg=--no-warm-up)")
    args = ap.parse_args()
    levels = [int(x) for x in args.streams.split(",")]
    server = None
    base = args.url
    if base is None:
        port = free_port()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        cmd = [os.path.join(root, "target/release/wgllm"), "serve", "--port", str(port),
               "--parallel", str(max(levels)), "-c", "512"]
        if args.model:
            cmd += ["-m", args.model]
        cmd += args.server_arg
        server = subprocess.Popen(cmd)
        base = f"http://127.0.0.1:{port}/v1"
        for _ in range(600):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
    try:
        stream_chat(base, 0, 4, args.api_key, "warm-up")  # warm-up: kernels compile on first use
        rows = []
        for c in levels:
            tokens, wall, ttft_med, ttft_max = level(base, c, args.n, args.requests, args.api_key)
            rows.append((c, tokens, wall, ttft_med, ttft_max))
            print(f"{c} stream(s): {tokens} tokens in {wall:.1f} s", file=sys.stderr)
        one = rows[0][1] / rows[0][2]
        print("| streams | tokens | wall s | aggregate t/s | vs 1 stream | TTFT median s | TTFT max s |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for c, tokens, wall, med, mx in rows:
            tps = tokens / wall
            print(f"| {c} | {tokens} | {wall:.1f} | {tps:.2f} | {tps / one:.2f}x | {med:.2f} | {mx:.2f} |")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
