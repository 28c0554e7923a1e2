#!/usr/bin/env python3
"""Load test of `wgllm serve` (RELIABILITY.md, section 5): concurrent clients for a fixed time,
then checks that the server survived and came back to its baseline.

    python3 benches/serve_load.py [--url http://127.0.0.1:8080] [--clients 32] [--minutes 10]
                                  [--sample 30] [--server-log FILE]

Without --url it starts `target/release/wgllm serve -m smollm2-135m --parallel 8` on a free port of
127.0.0.1 (and stops it after). Every client loops until the time is up (and at most --requests
times): most send chat or completion requests, streaming or not, and check each answer is complete
(a final chunk with a finish reason and `data: [DONE]`, or a whole JSON response) or an OpenAI
error object; about a tenth cancel a stream after a few chunks; about a tenth send malformed or
hostile bodies (broken JSON, wrong types, out-of-range fields, deep nesting, huge token ids,
unknown routes, oversized bodies) and expect a 4xx error object. Afterwards: the server process is
alive, /health answers, the ledger's bytes (/metrics) are what they were after the warm-up, the
peak is within the budget, and the resident set is within 5% of its value after the warm-up.
The warm-up runs `--parallel` requests together, then a staircase of as many that decode together
and end one by one, so that the kernels of every batched-decode row count are compiled before the
baseline is taken (on lavapipe a kernel is machine code in the server's memory).
Every --sample seconds it prints the resident set, the compiled kernels (when /metrics has
`wgllm_kernels_compiled`) and the requests so far, so a plateau can be told from a leak.
All traffic goes to 127.0.0.1; only the Python standard library is used.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

TOPICS = ["the sea", "a mountain", "autumn", "a city at night", "a library", "the desert",
          "a train journey", "the first snow", "a lighthouse", "an old map"]

HOSTILE = [
    ("/v1/chat/completions", b'{"messages": ['),
    ("/v1/chat/completions", b'{"messages": "hi"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e400}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 99, "logprobs": true}'),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 10000 + b"]" * 10000 + b"}"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}'),
    ("/v1/chat/completions", b'\xff\xfe\x00garbage'),
    ("/v1/completions", b'{"prompt": [4294967295, 1, 2]}'),
    ("/v1/completions", b'{"prompt": ["a", "b"]}'),
    ("/v1/completions", b'{"prompt": "' + b"word " * 3000 + b'"}'),
    ("/v1/completions", b'{"prompt": "x", "n": 3}'),
    ("/v1/embeddings", b'{"input": [], "encoding_format": "float"}'),
    ("/v1/embeddings", b'{"input": "x", "encoding_format": "hex"}'),
    ("/v1/nope", b'{}'),
]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.latency = []          # seconds of each complete response
        self.ttft = []             # seconds to the first streamed token
        self.kinds = {}            # outcome -> count
        self.bad = []              # answers that were neither complete nor an error object

    def add(self, kind, latency=None, ttft=None):
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
            if latency is not None:
                self.latency.append(latency)
            if ttft is not None:
                self.ttft.append(ttft)

    def fail(self, what):
        with self.lock:
            self.kinds["incomplete"] = self.kinds.get("incomplete", 0) + 1
            if len(self.bad) < 20:
                self.bad.append(what)


def error_kind(status, body):
    """The error object's code (or type), or None when the body is not OpenAI's error object."""
    try:
        err = json.loads(body)["error"]
        return f"{status} {err.get('code') or err['type']}"
    except (ValueError, KeyError, TypeError):
        return None


def request(host, port, method, path, body=None, timeout=600):
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def generation(host, port, rng, stats, cancel):
    chat = rng.random() < 0.6
    stream = cancel or rng.random() < 0.5
    n = rng.choice([8, 16, 32, 48])
    prompt = f"Write a few lines about {rng.choice(TOPICS)} (#{rng.randrange(1 << 30)})."
    body = {"max_tokens": n, "temperature": rng.choice([0, 0.7, 1.0]), "stream": stream,
            "seed": rng.randrange(1 << 31)}
    if chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = prompt
    if rng.random() < 0.2:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    conn, resp = request(host, port, "POST", path, json.dumps(body).encode())
    try:
        if resp.status != 200:
            data = resp.read()
            kind = error_kind(resp.status, data)
            if kind is None:
                stats.fail(f"{path} {resp.status}: {data[:200]!r}")
            else:
                stats.add(kind)
            return
        if not stream:
            data = json.loads(resp.read())
            if data["choices"][0].get("finish_reason") in ("stop", "length"):
                stats.add("complete", time.perf_counter() - t0)
            else:
                stats.fail(f"{path}: no finish reason: {str(data)[:200]}")
            return
        ttft, finish, done, chunks = None, None, False, 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                stats.add("stream error")
                return
            chunks += 1
            for c in chunk.get("choices", []):
                if ttft is None and (c.get("text") or (c.get("delta") or {}).get("content")):
                    ttft = time.perf_counter() - t0
                finish = c.get("finish_reason") or finish
            if cancel and chunks >= 3:
                stats.add("cancelled")
                return
        if done and finish in ("stop", "length"):
            stats.add("complete", time.perf_counter() - t0, ttft)
        else:
            stats.fail(f"{path} stream: done={done} finish={finish}")
    finally:
        conn.close()


def staircase(host, port, k, stats):
    """Warm-up request `k` of a staircase: `ignore_eos` and 16 + 4k tokens, so that of `parallel`
    such requests sent together all decode at once and then end one by one, and the batched
    decode runs with every row count from `parallel` down to 1 (each count of rows can need
    kernels of its own: the subgroup matvec takes 1, 2, 4 or 8 tokens a pass)."""
    body = {"prompt": f"Count the steps of staircase {k}:", "max_tokens": 16 + 4 * k,
            "temperature": 0, "ignore_eos": True}
    conn, resp = request(host, port, "POST", "/v1/completions", json.dumps(body).encode())
    try:
        data = json.loads(resp.read())
        if resp.status == 200 and data["choices"][0].get("finish_reason") == "length":
            stats.add("complete")
        else:
            stats.fail(f"staircase {k}: {resp.status} {str(data)[:200]}")
    finally:
        conn.close()


def hostile(host, port, rng, stats, max_body):
    if rng.random() < 0.1:
        path, body = "/v1/chat/completions", b'{"messages": "' + b"x" * (max_body + 1024) + b'"}'
    else:
        path, body = rng.choice(HOSTILE)
    try:
        conn, resp = request(host, port, "POST", path, body, timeout=120)
    except (ConnectionError, http.client.HTTPException, OSError) as e:
        # An oversized body may be refused while it is still being sent.
        stats.add("hostile: connection closed" if len(body) > max_body else "hostile: " + type(e).__name__)
        return
    try:
        data = resp.read()
        kind = error_kind(resp.status, data)
        if resp.status >= 500 or kind is None:
            stats.fail(f"hostile {path} {body[:60]!r}: {resp.status} {data[:200]!r}")
        else:
            stats.add("hostile " + kind)
    finally:
        conn.close()


def client(i, host, port, deadline, requests, stats, max_body):
    rng = random.Random(i)
    for _ in range(requests):
        if time.monotonic() > deadline:
            return
        r = rng.random()
        try:
            if r < 0.1:
                hostile(host, port, rng, stats, max_body)
            else:
                generation(host, port, rng, stats, cancel=r < 0.2)
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            stats.fail(f"client {i}: {type(e).__name__}: {e}")


def metrics(host, port):
    conn, resp = request(host, port, "GET", "/metrics", timeout=60)
    text = resp.read().decode()
    conn.close()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def sampler(host, port, stats, every, stop, series, t0):
    """Every `every` seconds until `stop` is set: (seconds, RSS bytes, kernels, requests) into
    `series`, printed as it comes."""
    while not stop.wait(every):
        try:
            m = metrics(host, port)
        except (OSError, http.client.HTTPException, ValueError):
            continue  # a busy server may miss one sample; the next one counts
        with stats.lock:
            done = sum(stats.kinds.values())
        row = (time.perf_counter() - t0, m.get("wgllm_process_resident_bytes", 0),
               m.get("wgllm_kernels_compiled"), done)
        series.append(row)
        kernels = "" if row[2] is None else f", kernels {row[2]:.0f}"
        print(f"  t={row[0]:4.0f} s: RSS {row[1] / 2**20:.1f} MiB{kernels}, {done} requests",
              file=sys.stderr, flush=True)


def ledger_bytes(m):
    return sum(v for k, v in m.items() if k.startswith("wgllm_vram_bytes{"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--requests", type=int, default=10000, help="most requests per client")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--max-body", type=int, default=1 << 20)
    ap.add_argument("--budget", default="2GiB")
    ap.add_argument("--sample", type=float, default=30,
                    help="seconds between RSS samples during the run (0: none)")
    ap.add_argument("--server-log", help="file for the started server's stderr (default: dropped)")
    a = ap.parse_args()

    server = None
    if a.url:
        u = urllib.parse.urlparse(a.url)
        host, port = u.hostname, u.port
        assert host in ("127.0.0.1", "localhost"), "the load test talks to this machine only"
    else:
        host, port = "127.0.0.1", free_port()
        exe = os.path.join(os.path.dirname(__file__), "..", "target", "release", "wgllm")
        cmd = [exe, "serve", "-m", a.model, "--parallel", str(a.parallel), "-c", "512",
               "--host", host, "--port", str(port), "--max-body", str(a.max_body),
               "--budget", a.budget]
        print("$", " ".join(cmd), file=sys.stderr)
        log = open(a.server_log, "w") if a.server_log else subprocess.DEVNULL
        server = subprocess.Popen(cmd, stderr=log)
    try:
        for _ in range(600):
            try:
                conn, resp = request(host, port, "GET", "/health", timeout=5)
                resp.read()
                conn.close()
                break
            except OSError:
                if server and server.poll() is not None:
                    sys.exit("the server exited while starting")
                time.sleep(1)
        # Warm-up: every kernel compiled, every slot's buffers in place. Kernels are compiled
        # when first needed, and on lavapipe each is LLVM machine code and state held in this
        # process (about 20 MiB each with SmolLM2: the four the batched decode of 5-8 rows adds
        # grew the resident set by 81 MiB), so the resident set is measured once the prompts and
        # every row count of the batched decode have run.
        warm = Stats()
        for target, args in ((generation, lambda k: (random.Random(-k), warm, False)),
                             (staircase, lambda k: (k, warm))):
            threads = [threading.Thread(target=target, args=(host, port) + args(k))
                       for k in range(a.parallel)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if warm.bad:
            sys.exit(f"the warm-up failed: {warm.bad[0]}")
        time.sleep(1)
        base = metrics(host, port)
        print(f"after warm-up: ledger {ledger_bytes(base):.0f} B, "
              f"RSS {base.get('wgllm_process_resident_bytes', 0):.0f} B"
              + (f", kernels {base['wgllm_kernels_compiled']:.0f}"
                 if "wgllm_kernels_compiled" in base else ""), file=sys.stderr)

        stats = Stats()
        deadline = time.monotonic() + a.minutes * 60
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i, host, port, deadline, a.requests, stats,
                                                         a.max_body))
                   for i in range(a.clients)]
        stop, series = threading.Event(), []
        if a.sample > 0:
            threads.append(threading.Thread(target=sampler, args=(host, port, stats, a.sample,
                                                                  stop, series, t0)))
        for t in threads:
            t.start()
        for t in threads[:a.clients]:
            t.join()
        stop.set()
        for t in threads[a.clients:]:
            t.join()
        wall = time.perf_counter() - t0
        time.sleep(2)  # cancelled slots are freed at the engine's next step

        alive = server is None or server.poll() is None
        conn, resp = request(host, port, "GET", "/health", timeout=60)
        health = resp.status
        resp.read()
        conn.close()
        after = metrics(host, port)
        lb, la = ledger_bytes(base), ledger_bytes(after)
        rb = base.get("wgllm_process_resident_bytes", 0)
        ra = after.get("wgllm_process_resident_bytes", 0)
        peak = after.get("wgllm_vram_peak_total_bytes",
                         sum(v for k, v in after.items() if k.startswith("wgllm_vram_peak_bytes{")))
        budget = after.get("wgllm_vram_budget_bytes")
        lat = sorted(stats.latency)
        pct = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
        total = sum(stats.kinds.values())
        print(f"{a.clients} clients for {wall:.0f} s: {total} requests")
        print(f"complete responses: {len(lat)}, latency p50 {pct(0.5):.2f} s, p99 {pct(0.99):.2f} s")
        if stats.ttft:
            print(f"time to first token (streams): p50 {statistics.median(stats.ttft):.2f} s")
        for k in sorted(stats.kinds):
            print(f"  {k}: {stats.kinds[k]}")
        print(f"server alive: {alive}; /health: {health}; "
              f"tokens generated: {after.get('wgllm_tokens_generated_total', 0):.0f}")
        print(f"ledger: {lb:.0f} B after warm-up, {la:.0f} B after the run; peak {peak:.0f} B"
              + (f" (budget {budget:.0f} B)" if budget else ""))
        print(f"RSS: {rb / 2**20:.1f} MiB after warm-up, {ra / 2**20:.1f} MiB after the run "
              f"({(ra / rb - 1) * 100 if rb else float('nan'):+.2f}%)")
        if series:
            rss = [r[1] / 2**20 for r in series]
            third = max(1, len(rss) // 3)
            print(f"RSS samples every {a.sample:.0f} s: {len(rss)}, min {min(rss):.1f} MiB, "
                  f"max {max(rss):.1f} MiB; first third's mean {statistics.mean(rss[:third]):.1f} "
                  f"MiB, last third's {statistics.mean(rss[-third:]):.1f} MiB")
        if "wgllm_kernels_compiled" in after:
            print(f"kernels compiled: {base.get('wgllm_kernels_compiled', 0):.0f} after warm-up, "
                  f"{after['wgllm_kernels_compiled']:.0f} after the run")
        ok = (alive and health == 200 and not stats.bad and la == lb
              and (budget is None or peak <= budget) and (not rb or ra <= rb * 1.05))
        for b in stats.bad:
            print("BAD:", b)
        print("PASS" if ok else "FAIL")
        return 0 if ok else 1
    finally:
        if server:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
