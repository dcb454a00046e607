"""Load test of `tunesmith serve` on loopback: concurrent clients for a fixed time, in one run.

    .venv/bin/python benchmarks/bench_serve.py --classifier RUN [--chat smollm2-135m] [--clients 16] [--seconds 60]

Each server is `tunesmith serve` in its own process on 127.0.0.1 (nothing else listens). The load
is one asyncio process with `--clients` concurrent clients, each sending its next request as soon
as the last one is answered, for `--seconds`; requests still in flight at the end are waited for
and counted. Classifier requests carry one review each from the run's test file (the realistic
case for batching: many small requests); chat requests ask a chatterbot question with
`max_tokens` 32 at temperature 0.7.

Rows:
- classifier, dynamic batching (the default: up to 32 inputs, a 5 ms window);
- classifier, one request at a time (`--max-batch 1`): what batching is compared with;
- classifier, dynamic batching on the ONNX export (`--onnx`), when RUN/onnx exists;
- chat, batched generation (the default: up to 16 answers together, a 20 ms window);
- chat, one answer at a time (`--max-batch 1`). Answer tokens are counted from each stream's usage.

Printed and written as JSON: requests/s, p50/p99 latency, errors (non-200 or broken connections),
dropped (sent but never answered), the servers' mean batch, and for chat tokens/s. The client
shares the 2 cores with the server; its share is printed (CPU seconds of the load process).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(source: str, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-serve-{port}.log"
    proc = subprocess.Popen([str(ROOT / ".venv/bin/tunesmith"), "serve", source, "--port", str(port), *flags],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx2 as httpx

    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 180 s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


async def load(url: str, make_request, clients: int, seconds: float, stream: bool) -> dict:
    import httpx2 as httpx

    latencies: list[float] = []
    errors = sent = answered = tokens = 0
    end = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        async def one_client(seed: int) -> None:
            nonlocal errors, sent, answered, tokens
            rng = random.Random(seed)
            while time.perf_counter() < end:
                path, body = make_request(rng)
                t0 = time.perf_counter()
                sent += 1
                try:
                    if stream:
                        async with client.stream("POST", path, json=body) as r:
                            ok = r.status_code == 200
                            async for line in r.aiter_lines():  # the last chunk carries the usage
                                if line.startswith("data: {") and '"usage"' in line:
                                    tokens += (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", 0)
                    else:
                        r = await client.post(path, json=body)
                        ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                answered += 1
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    latencies.sort()
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    out = {"clients": clients, "seconds": round(wall, 1), "requests": answered, "requests_per_s": round(answered / wall, 1),
           "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1), "errors": errors, "dropped": sent - answered}
    if stream:
        out["tokens_per_s"] = round(tokens / wall, 1)
    return out


def texts_of(run: Path, n: int = 512) -> list[str]:
    sys.path.insert(0, str(ROOT / "src"))
    from tunesmith.export_onnx import sample_texts

    return sample_texts(run, n)


def classifier_rows(run: str, clients: int, seconds: float) -> list[dict]:
    texts = texts_of(Path(run))
    request = lambda rng: ("/v1/classify", {"texts": [rng.choice(texts)]})  # noqa: E731
    rows = []
    variants = [("dynamic batching", []), ("one request at a time", ["--max-batch", "1"])]
    if (Path(run) / "onnx" / "export.json").exists():
        variants.append(("dynamic batching, ONNX", ["--onnx"]))
    for name, flags in variants:
        proc, url, _ = start(run, *flags)
        try:
            cpu0 = time.process_time()
            r = asyncio.run(load(url, request, clients, seconds, stream=False))
            r["client_cpu_s"] = round(time.process_time() - cpu0, 1)
            import httpx2 as httpx

            r["mean_batch"] = httpx.get(f"{url}/health").json()["batching"]["mean_batch"]
        finally:
            stop(proc)
        rows.append({"server": f"classifier, {name}", **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def chat_rows(source: str, clients: int, seconds: float, max_tokens: int, single: bool = True) -> list[dict]:
    import importlib.util

    questions = ["What is a computer?", "How do I reset my password?", "What is the internet?", "Tell me a joke.",
                 "What is artificial intelligence?", "How do I install software?", "What is a CPU?", "Hello!"]
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec:  # the chatterbot questions when the corpus is installed
        import yaml

        base = Path(spec.submodule_search_locations[0]) / "data" / "english"
        for f in ("computers.yml", "ai.yml"):
            if (base / f).exists():
                questions += [c[0] for c in yaml.safe_load((base / f).read_text()).get("conversations", []) if c]
    request = lambda rng: ("/v1/chat/completions", {  # noqa: E731
        "messages": [{"role": "user", "content": rng.choice(questions)}], "max_tokens": max_tokens,
        "temperature": 0.7, "stream": True, "stream_options": {"include_usage": True}})
    rows = []
    variants = [("batched generation", []), ("one answer at a time", ["--max-batch", "1"])]
    for name, flags in variants[: 2 if single else 1]:
        proc, url, _ = start(source, *flags)
        try:
            r = asyncio.run(load(url, request, clients, seconds, stream=True))
            import httpx2 as httpx

            r["mean_batch"] = httpx.get(f"{url}/health").json()["batching"]["mean_batch"]
        finally:
            stop(proc)
        rows.append({"server": f"chat, {name}", "max_tokens": max_tokens, **r})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classifier", help="a text classifier run directory")
    ap.add_argument("--chat", help="a chat run, model directory or packaged name (e.g. smollm2-135m)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--no-single", action="store_true", help="chat: skip the one-answer-at-a-time row")
    ap.add_argument("--json", default="bench_serve.json")
    a = ap.parse_args()
    rows = []
    if a.classifier:
        rows += classifier_rows(a.classifier, a.clients, a.seconds)
    if a.chat:
        rows += chat_rows(a.chat, a.clients, a.seconds, a.max_tokens, single=not a.no_single)
    print(f"\n{'server':44} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} {'dropped':>7} {'batch':>6}")
    for r in rows:
        print(f"{r['server']:44} {r['requests_per_s']:7.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:6d} "
              f"{r['dropped']:7d} {r.get('mean_batch', 1):6}")
    batched = next((r for r in rows if r["server"] == "classifier, dynamic batching"), None)
    single = next((r for r in rows if r["server"] == "classifier, one request at a time"), None)
    if batched and single:
        print(f"dynamic batching: {batched['requests_per_s'] / single['requests_per_s']:.2f}x the throughput of one "
              f"request at a time; classifier p99/p50 {batched['p99_ms'] / batched['p50_ms']:.2f}")
    chat = [r for r in rows if r["server"].startswith("chat")]
    if len(chat) == 2:
        print(f"chat: {chat[0]['tokens_per_s']:.1f} against {chat[1]['tokens_per_s']:.1f} answer tokens/s "
              f"({chat[0]['tokens_per_s'] / chat[1]['tokens_per_s']:.2f}x)")
    Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
