"""Load test of `clipposter app`: concurrent clients against its analyse-poster API on 127.0.0.1.

Each request is what the page does when a user drops a poster: upload the file
(POST /gradio_api/upload), queue the analysis (POST /gradio_api/call/analyse_poster) and read its
answer from the event stream (GET .../<event_id>): genre probabilities, taglines and similar
posters. With --search-share some requests are text searches (/gradio_api/call/search_text)
instead. A request counts as an error when any step fails: an HTTP error, a refused or failed
event, an answer carrying an error, a timeout.

An answer counts only when it carries a real result: an analysis needs a probability in [0, 1] for
every genre, at least one non-empty tagline and at least one similar poster; a search at least one
poster, best first. The first answer of each kind is kept in the report ("examples").

Two phases against the same server: a baseline with one client (the latency of a lone request),
then the load phase (default 20 clients for 30 s, each sending its next request as soon as the last
one answered; with --requests N each client sends exactly N requests instead, in both phases).
Reported per phase: requests, errors (and the first distinct messages), throughput, latency
p50/p95/p99/max, the app's own model time per request, and the ratio of loaded to baseline p50. The app runs its models one
request at a time by default, so under load the latency grows with the queue while the throughput
stays that of one request stream; the target is no errors.

The server is started here, in a subprocess (so that the clients do not share its interpreter),
from --run DIR (a folder `clipposter demo` wrote); without --run a small demo run (160 synthetic
posters, tiny models) is built in a temporary folder first. --url tests an app that is already
running instead. The posters uploaded are synthetic ones the run has not seen (encoded on the fly).

    python scripts/bench/app_load.py [--run DIR | --url URL] [--concurrency 20] [--duration 30 | --requests N]
                                     [--baseline 5] [--search-share 0] [--json]

Exit status 1 when any request errored.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ANALYSE_API = "analyse_poster"
SEARCH_API = "search_text"
SEARCH_TEXTS = ["a haunted house at night", "a cowboy at sunset", "a spaceship over a planet",
                "two lovers in the rain", "an explosion in the city", "a cartoon animal"]
MAX_MESSAGES = 5


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_forever(args) -> int:
    """--serve mode: the app for --run on 127.0.0.1:--port, until killed (the parent's subprocess)."""
    from clipposter.analysis import PosterAnalyzer
    from clipposter.app.page import serve

    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    analyzer = PosterAnalyzer.from_run(args.run, device="cpu")
    serve(analyzer, host="127.0.0.1", port=args.port, max_upload_mb=args.max_upload_mb,
          concurrency=args.app_concurrency, quiet=True, block=True)
    return 0


def start_server(run_dir: str, args, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--run", run_dir, "--port", str(port),
           "--max-upload-mb", str(args.max_upload_mb), "--app-concurrency", str(args.app_concurrency)]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the app exited with status {proc.returncode}; the end of its log:\n"
                             + log_path.read_text(errors="replace")[-3000:])
        try:
            if httpx.get(f"{url}/gradio_api/info", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"error: the app did not answer within {args.start_timeout:.0f} s; the end of its log:\n"
                     + log_path.read_text(errors="replace")[-3000:])


def build_run(folder: Path) -> str:
    from clipposter.pipeline import run_demo

    print(f"building a small demo run in {folder} (160 synthetic posters, tiny models)...", file=sys.stderr)
    run_demo(folder, n=160, seed=5, online=False, progress=False)
    return str(folder)


def make_posters(folder: Path, n: int) -> list[bytes]:
    """n synthetic posters that a demo run (seeds 0 and 5) has not seen."""
    from clipposter.ingest.synthetic import generate_posters

    records = generate_posters(folder, n=n, seed=4242, progress=False)
    return [Path(r.image).read_bytes() for r in records]


# ------------------------------------------------------------------------------------------------
# the clients
# ------------------------------------------------------------------------------------------------
class RequestFailed(Exception):
    pass


async def call_endpoint(client: httpx.AsyncClient, api: str, data: list) -> list:
    """Queue one event on a named endpoint and read its result from the event stream."""
    r = await client.post(f"/gradio_api/call/{api}", json={"data": data})
    if r.status_code != 200:
        raise RequestFailed(f"{api}: HTTP {r.status_code} {r.text[:200]}")
    event_id = r.json()["event_id"]
    event = None
    async with client.stream("GET", f"/gradio_api/call/{api}/{event_id}") as stream:
        if stream.status_code != 200:
            raise RequestFailed(f"{api}: result HTTP {stream.status_code}")
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = line.split(":", 1)[1].strip()
                if event == "error":
                    raise RequestFailed(f"{api}: event error {payload[:200]}")
                return json.loads(payload)
    raise RequestFailed(f"{api}: the event stream ended without a result (last event {event!r})")


def result_of(outputs) -> dict:
    if isinstance(outputs, list) and outputs and isinstance(outputs[-1], dict):
        return outputs[-1]
    raise RequestFailed(f"unexpected answer {str(outputs)[:200]}")


async def analyse_once(client: httpx.AsyncClient, poster: bytes, name: str, rng: random.Random) -> dict:
    r = await client.post("/gradio_api/upload", files={"files": (name, poster, "image/jpeg")})
    if r.status_code != 200:
        raise RequestFailed(f"upload: HTTP {r.status_code} {r.text[:200]}")
    path = r.json()[0]
    strategy = rng.choice(["lstm", "greedy", "beam"])
    result = result_of(await call_endpoint(
        client, ANALYSE_API, [{"path": path, "meta": {"_type": "gradio.FileData"}}, strategy, 3, 8]))
    if result.get("error"):
        raise RequestFailed(f"analyse: {result['error']}")
    probs = result.get("probabilities")
    if not isinstance(probs, dict) or not probs or not all(
            isinstance(p, (int, float)) and 0 <= p <= 1 for p in probs.values()):
        raise RequestFailed(f"analyse: no genre probabilities in [0, 1] in {str(result)[:200]}")
    taglines = result.get("taglines")
    if not isinstance(taglines, list) or not taglines or not all(isinstance(t, str) and t.strip() for t in taglines):
        raise RequestFailed(f"analyse: no taglines in {str(result)[:200]}")
    if not result.get("neighbours"):
        raise RequestFailed(f"analyse: no similar posters in {str(result)[:200]}")
    return result


async def search_once(client: httpx.AsyncClient, rng: random.Random) -> dict:
    result = result_of(await call_endpoint(client, SEARCH_API, [rng.choice(SEARCH_TEXTS), 8]))
    if result.get("error"):
        raise RequestFailed(f"search: {result['error']}")
    hits = result.get("results")
    if not isinstance(hits, list) or not hits or not all(isinstance(h, dict) and h.get("id") for h in hits):
        raise RequestFailed(f"search: no posters in {str(result)[:200]}")
    scores = [h.get("score") for h in hits]
    if scores != sorted(scores, reverse=True):
        raise RequestFailed(f"search: posters not best first: scores {scores}")
    return result


def example(kind: str, result: dict) -> dict:
    """What the report keeps of an answer: enough to check it against the run."""
    if kind == "analyse":
        return {"probabilities": result.get("probabilities"), "predicted": result.get("predicted"),
                "taglines": result.get("taglines"), "neighbours": [h.get("id") for h in result.get("neighbours", [])],
                "source": result.get("source")}
    return {"query": result.get("query"),
            "results": [{"id": h.get("id"), "score": h.get("score")} for h in result.get("results", [])]}


async def run_phase(url: str, posters: list[bytes], *, clients: int, duration: float, search_share: float,
                    timeout: float, label: str, quiet: bool, seed: int, requests: int | None = None) -> dict:
    """Clients send requests back to back: for `duration` seconds, or exactly `requests` each."""
    limits = httpx.Limits(max_connections=clients * 2 + 4, max_keepalive_connections=clients * 2 + 4)
    latencies: list[float] = []
    kinds = {"analyse": 0, "search": 0}
    sources: dict[str, int] = {}
    service_ms: list[float] = []
    errors: list[str] = []
    examples: dict[str, dict] = {}
    start = time.perf_counter()
    deadline = start + duration

    async def worker(i: int, client: httpx.AsyncClient):
        rng = random.Random(seed * 1000 + i)
        n = 0
        while (n < requests) if requests else (time.perf_counter() < deadline):
            t0 = time.perf_counter()
            search = rng.random() < search_share
            try:
                if search:
                    result = await asyncio.wait_for(search_once(client, rng), timeout)
                else:
                    poster = posters[(i + n * clients) % len(posters)]
                    result = await asyncio.wait_for(analyse_once(client, poster, f"poster-{i}-{n}.jpg", rng), timeout)
                    sources[result.get("source", "?")] = sources.get(result.get("source", "?"), 0) + 1
                latencies.append(time.perf_counter() - t0)
                kind = "search" if search else "analyse"
                kinds[kind] += 1
                examples.setdefault(kind, example(kind, result))
                if result.get("elapsed_ms") is not None:
                    service_ms.append(float(result["elapsed_ms"]))
            except asyncio.TimeoutError:
                errors.append(f"timeout after {timeout:.0f} s")
            except (RequestFailed, httpx.HTTPError, ValueError, KeyError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            n += 1

    async def progress():
        while True:
            await asyncio.sleep(5)
            elapsed = time.perf_counter() - start
            print(f"{label}: {elapsed:5.1f} s, {len(latencies)} requests, {len(errors)} errors",
                  file=sys.stderr, flush=True)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(timeout)) as client:
        ticker = None if quiet else asyncio.create_task(progress())
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
        if ticker:
            ticker.cancel()
    wall = time.perf_counter() - start
    distinct = list(dict.fromkeys(errors))[:MAX_MESSAGES]
    return {"clients": clients, "seconds": round(wall, 2), "requests": len(latencies) + len(errors),
            "ok": len(latencies), "errors": len(errors), "error_messages": distinct, "kinds": kinds,
            "sources": sources, "examples": examples, "throughput_rps": round(len(latencies) / wall, 2) if wall else 0.0,
            "latency_ms": summarize(latencies, scale=1000.0),
            "service_ms": summarize(service_ms, scale=1.0)}


def warm_up(url: str, poster: bytes, timeout: float) -> None:
    """One analysis and one search before measuring: the first loads the backbone, compiles, warms caches."""
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(timeout)) as client:
            rng = random.Random(0)
            await analyse_once(client, poster, "warm-up.jpg", rng)
            await search_once(client, rng)
    try:
        asyncio.run(go())
    except (RequestFailed, httpx.HTTPError) as exc:
        raise SystemExit(f"error: the warm-up request failed: {exc}") from None


def summarize(values: list[float], scale: float) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    xs = sorted(v * scale for v in values)

    def q(p):  # nearest-rank percentile
        return round(xs[min(len(xs) - 1, max(0, int(-(-p * len(xs) // 100)) - 1))], 1)

    return {"p50": q(50), "p95": q(95), "p99": q(99), "max": round(xs[-1], 1), "mean": round(sum(xs) / len(xs), 1)}


def fmt_phase(name: str, p: dict) -> str:
    lat = p["latency_ms"]
    line = (f"{name:<9} {p['clients']:>3} clients  {p['seconds']:>6.1f} s  {p['requests']:>5} requests  "
            f"{p['errors']:>3} errors  {p['throughput_rps']:>6.2f} req/s  latency ms p50 {lat['p50']}  "
            f"p95 {lat['p95']}  p99 {lat['p99']}  max {lat['max']}  (model time p50 {p['service_ms']['p50']} ms)")
    for msg in p["error_messages"]:
        line += f"\n          error: {msg}"
    return line


# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--run", help="a run folder (from `clipposter demo`) to serve; default: build a small one")
    src.add_argument("--url", help="an app that is already running, e.g. http://127.0.0.1:7860")
    ap.add_argument("--concurrency", type=int, default=20, help="clients in the load phase")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of the load phase")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per client in each phase instead of --duration/--baseline seconds "
                         "(--baseline 0 still skips the baseline)")
    ap.add_argument("--baseline", type=float, default=5.0, help="seconds of the one-client baseline (0: skip)")
    ap.add_argument("--search-share", type=float, default=0.0,
                    help="share of requests that are text searches instead of poster analyses (0 to 1)")
    ap.add_argument("--posters", type=int, default=8, help="distinct poster files the clients upload")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a request counts as failed")
    ap.add_argument("--max-upload-mb", type=float, default=10.0, help="the served app's upload limit")
    ap.add_argument("--app-concurrency", type=int, default=1, help="the served app's model concurrency")
    ap.add_argument("--torch-threads", type=int, default=None, help="torch threads in the served app")
    ap.add_argument("--start-timeout", type=float, default=180.0, help="seconds to wait for the app to answer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.baseline < 0 or not 0 <= args.search_share <= 1:
        ap.error("--concurrency ≥ 1, --duration > 0, --baseline ≥ 0 and --search-share in [0, 1] please")
    if args.requests is not None and args.requests < 1:
        ap.error(f"--requests must be at least 1, got {args.requests}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_forever(args)
    proc = None
    with tempfile.TemporaryDirectory(prefix="clipposter-load-") as tmp:
        tmp = Path(tmp)
        try:
            if args.url:
                url = args.url.rstrip("/")
            else:
                run_dir = args.run or build_run(tmp / "run")
                proc, url = start_server(run_dir, args, tmp / "app.log")
            posters = make_posters(tmp / "posters", max(1, args.posters))
            warm_up(url, posters[0], args.timeout)
            phases = {}
            if args.baseline > 0:
                phases["baseline"] = asyncio.run(run_phase(
                    url, posters, clients=1, duration=args.baseline, search_share=args.search_share,
                    timeout=args.timeout, label="baseline", quiet=args.json, seed=args.seed, requests=args.requests))
            phases["load"] = asyncio.run(run_phase(
                url, posters, clients=args.concurrency, duration=args.duration, search_share=args.search_share,
                timeout=args.timeout, label="load", quiet=args.json, seed=args.seed + 1, requests=args.requests))
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
    base_p50 = phases.get("baseline", {}).get("latency_ms", {}).get("p50")
    load_p50 = phases["load"]["latency_ms"]["p50"]
    ratio = round(load_p50 / base_p50, 2) if base_p50 and load_p50 else None
    errors = sum(p["errors"] for p in phases.values())
    result = {"url": url, "started_here": proc is not None, "run": args.run if proc is not None else None,
              "endpoint": ANALYSE_API, "search_share": args.search_share, "cpus": os.cpu_count(),
              "app_concurrency": args.app_concurrency if proc is not None else None,
              "phases": phases, "p50_ratio_load_to_baseline": ratio, "errors": errors,
              "target": "no errors", "passed": errors == 0}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"clipposter app load test: {url} ({os.cpu_count()} CPUs), endpoint /{ANALYSE_API}"
              + (f", {args.search_share:.0%} text searches" if args.search_share else ""))
        for name, p in phases.items():
            print(fmt_phase(name, p))
        if ratio is not None:
            load = phases["load"]
            print(f"loaded p50 / baseline p50 = {ratio}× (requests wait in the app's queue: by Little's law the "
                  f"loaded latency ≈ clients / throughput = {load['clients'] / max(load['throughput_rps'], 1e-9):.2f} s)")
        print("target: no errors — " + ("met" if errors == 0 else f"NOT met ({errors} errors)"))
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
