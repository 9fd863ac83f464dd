"""Load test of `blip serve`: throughput and latency with dynamic batching on and off, 1 / 4 / 16 concurrent clients,
on the tiny test model and on a BLIP-base-size captioner (random weights, built with transformers).

    .venv/bin/python benchmarks/serve_load.py [--models tiny base] [--clients 1 4 16] [--routes caption chat]
        [--out runs/bench/serve_load.json]

Each configuration starts `blip serve` in a subprocess on 127.0.0.1 (batching on: --max-batch 16 --max-wait-ms 5;
off: --no-batching), then runs closed-loop clients: each sends POST /v1/caption (route "caption") or the same image
as an OpenAI chat completion, POST /v1/chat/completions (route "chat", `--routes`), with one distinct PNG image and
waits for the answer before sending the next. Reports requests/s, p50/p99 latency and the mean batch size the server ran
(read from its /metrics), and the throughput ratio batching on / off. Needs the [serve] extra and transformers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from oracle import TinySpec, base_spec, build_hf_checkpoint, make_images  # noqa: E402

BASE = base_spec("caption")  # BLIP-base sizes, full vocabulary
SPECS = {"tiny": TinySpec(kind="caption", seed=1), "base": BASE}
REQUESTS_PER_CLIENT = {"tiny": 30, "base": 2}  # closed loop: each client sends this many (base: ~2 s per image)
SINGLE_CLIENT_REQUESTS = {"tiny": 60, "base": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_payloads(n: int) -> list[str]:
    out = []
    for image in make_images(n, seed=123):
        buffer = io.BytesIO()
        image.resize((160, 120)).save(buffer, "PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


class Server:
    def __init__(self, model_dir: Path, batching: bool, threads: int | None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ["--max-batch", "16", "--max-wait-ms", "5"] if batching else ["--no-batching"]
        cmd = [sys.executable, "-m", "blip.serve.cli", "--model", f"cap={model_dir}", "--port", str(self.port)]
        cmd += flags + ["--queue-size", "64", "--timeout", "900", "--log-level", "warning"]
        cmd += ["--threads", str(threads)] if threads else []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
                try:
                    if c.get(f"{self.url}/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.3)
        raise RuntimeError("server did not become ready")

    def batch_stats(self) -> tuple[float, float]:
        """(sum of rows, number of model calls) for captioning so far, from /metrics."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            for name in ("blip_batch_size_sum", "blip_batch_size_count"):
                if line.startswith(f'{name}{{task="caption"}}'):
                    values[name] = float(line.split()[-1])
        return values.get("blip_batch_size_sum", 0.0), values.get("blip_batch_size_count", 0.0)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def caption_request(image: str) -> tuple[str, dict]:
    return "/v1/caption", {"images": [{"b64": image}]}


def chat_request(image: str) -> tuple[str, dict]:
    content = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}]
    return "/v1/chat/completions", {"model": "cap", "messages": [{"role": "user", "content": content}]}


ROUTES = {"caption": caption_request, "chat": chat_request}


async def run_clients(
    url: str, images: list[str], clients: int, per_client: int, route: str = "caption"
) -> tuple[list[float], float]:
    """Closed-loop clients; returns (latencies in seconds, wall time)."""
    transport = httpx.AsyncHTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=900, transport=transport, limits=limits) as client:

        async def one_client(k: int) -> None:
            for i in range(per_client):
                image = images[(k * per_client + i) % len(images)]
                start = time.perf_counter()
                path, body = ROUTES[route](image)
                response = await client.post(path, json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")

        start = time.perf_counter()
        await asyncio.gather(*(one_client(k) for k in range(clients)))
        return latencies, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "base"], choices=sorted(SPECS))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--routes", nargs="+", default=["caption", "chat"], choices=sorted(ROUTES))
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--workdir", help="where to build the checkpoints (default: a temporary folder)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="serve_load_"))
    images = image_payloads(64)
    rows = []
    for name in args.models:
        model_dir = workdir / name
        if not (model_dir / "config.json").exists():
            print(f"building the {name} checkpoint in {model_dir} ...", flush=True)
            build_hf_checkpoint(model_dir, SPECS[name])
        for batching in (True, False):
            server = Server(model_dir, batching, args.threads)
            try:
                server.wait_ready()
                asyncio.run(run_clients(server.url, images, 1, 2))  # warm up
                for route, clients in [(r, c) for r in args.routes for c in args.clients]:
                    per_client = SINGLE_CLIENT_REQUESTS[name] if clients == 1 else REQUESTS_PER_CLIENT[name]
                    rows_before, calls_before = server.batch_stats()
                    latencies, wall = asyncio.run(run_clients(server.url, images, clients, per_client, route))
                    rows_after, calls_after = server.batch_stats()
                    calls = max(calls_after - calls_before, 1)
                    row = {
                        "model": name,
                        "route": route,
                        "batching": "on" if batching else "off",
                        "clients": clients,
                        "requests": len(latencies),
                        "req_per_s": len(latencies) / wall,
                        "p50_ms": 1000 * statistics.median(latencies),
                        "p99_ms": 1000 * percentile(latencies, 99),
                        "mean_batch": (rows_after - rows_before) / calls,
                    }
                    rows.append(row)
                    print(
                        f"  {name:5} {route:7} batching {row['batching']:3} clients {clients:3}: "
                        f"{row['req_per_s']:8.2f} req/s  "
                        f"p50 {row['p50_ms']:9.1f} ms  p99 {row['p99_ms']:9.1f} ms  batch {row['mean_batch']:5.2f}",
                        flush=True,
                    )
            finally:
                server.stop()

    print()
    print(f"blip serve, 1 image per request, greedy 20 tokens; {os.cpu_count()} CPU cores")
    print("routes: caption = POST /v1/caption, chat = POST /v1/chat/completions (OpenAI schema)")
    header = "| model | route | clients | batching | requests | req/s | p50 ms | p99 ms | mean batch | on/off req/s |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    order = {name: i for i, name in enumerate(args.models)}
    routes = {route: i for i, route in enumerate(args.routes)}
    for row in sorted(
        rows, key=lambda r: (order[r["model"]], routes[r["route"]], r["clients"], r["batching"] == "off")
    ):
        same = ("model", "route", "clients")
        off = next(r for r in rows if all(r[k] == row[k] for k in same) and r["batching"] == "off")
        ratio = f"{row['req_per_s'] / off['req_per_s']:.2f}x" if row["batching"] == "on" else ""
        print(
            f"| {row['model']} | {row['route']} | {row['clients']} | {row['batching']} | {row['requests']} | "
            f"{row['req_per_s']:.2f} | "
            f"{row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['mean_batch']:.2f} | {ratio} |"
        )
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
