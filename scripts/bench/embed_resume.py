"""Resume of the local engine: `clipposter embed` SIGKILLed half way, then rerun, measured in one run.

  (a) full     an uninterrupted `clipposter embed` into a fresh cache: the baseline time
  (b) killed   the same command into another fresh cache, SIGKILLed as soon as its progress bar
               reports half the posters encoded (encoded, not committed: what it held in memory
               since its last shard is lost)
  (c) rerun    the same command again on the killed run's cache

Reported: the posters committed when the kill came, the posters the rerun encoded (it must encode
exactly the ones not committed: no committed poster twice), the posters encoded twice
(encoded by the killed run + by the rerun − all), which must be at most one shard of
`--shard-rows` posters, and the time lost (killed + rerun − full) in shards' worth of time. The
commands run in subprocesses with the shard size set to `--shard-rows` (`embed.FLUSH_ROWS`, 8,192 by
default; small here so that a short run holds several shards).

    python scripts/bench/embed_resume.py [--posters 2048] [--shard-rows 256] [--backbone clipposter-tiny] [--json]

Figures: docs/scaling.md ("Three set-ups").
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROGRESS = re.compile(r"embedding:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def command(manifest: Path, cache: Path, args) -> list[str]:
    code = ("import sys; from clipposter.embedding import embed; "
            f"embed.FLUSH_ROWS = {args.shard_rows}; "
            "from clipposter.cli.main import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, "embed", str(manifest), "--cache", str(cache), "--backbone", args.backbone,
            "--pretrained", "random", "--batch-size", str(args.batch_size), "--no-texts", "--workers", "0"]


def env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}


def run_to_end(cmd: list[str], threads: int) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(threads))
    if proc.returncode != 0:
        raise SystemExit(f"error: embed failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - started


def run_and_kill(cmd: list[str], at: int, threads: int) -> tuple[float, int]:
    """Run `cmd`; SIGKILL it once its bar shows `at` posters encoded. Returns (seconds, encoded then)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env(threads))
    seen = {"encoded": 0}
    done = threading.Event()

    def watch():
        buf = b""
        while True:
            chunk = proc.stderr.read1(4096)
            if not chunk:
                break
            buf = (buf + chunk)[-4096:]
            for m in PROGRESS.finditer(buf.decode("utf-8", "replace")):
                seen["encoded"] = max(seen["encoded"], int(m.group(1)))
            if seen["encoded"] >= at and not done.is_set():
                proc.send_signal(signal.SIGKILL)
                done.set()

    reader = threading.Thread(target=watch, daemon=True)
    reader.start()
    proc.wait()
    reader.join(timeout=5)
    if not done.is_set():
        raise SystemExit(f"error: the run ended before {at} posters were encoded; use more --posters")
    return time.perf_counter() - started, seen["encoded"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--posters", type=int, default=2048)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="clipposter-tiny")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from clipposter.embedding.cache import EmbeddingCache
    from clipposter.ingest.synthetic import generate_posters

    with tempfile.TemporaryDirectory(prefix="embed-resume-") as tmp:
        root = Path(tmp)
        generate_posters(root / "set", n=args.posters, seed=0, size=(200, 300))
        manifest = root / "set" / "manifest.csv"
        full = run_to_end(command(manifest, root / "full", args), args.threads)
        killed_s, encoded_at_kill = run_and_kill(command(manifest, root / "resume", args), args.posters // 2,
                                                 args.threads)
        with EmbeddingCache.open(root / "resume", mode="r") as cache:
            committed = cache.num_posters
        rerun_started = time.perf_counter()
        proc = subprocess.run(command(manifest, root / "resume", args) + ["--json"], capture_output=True, text=True,
                              env=env(args.threads))
        rerun_s = time.perf_counter() - rerun_started
        if proc.returncode != 0:
            raise SystemExit(f"error: the rerun failed: {proc.stderr.strip().splitlines()[-1:]}")
        rerun = json.loads(proc.stdout)["summary"]
        with EmbeddingCache.open(root / "resume", mode="r") as cache, \
                EmbeddingCache.open(root / "full", mode="r") as whole:
            same = cache.num_posters == whole.num_posters == args.posters
    per_shard = full / args.posters * args.shard_rows
    lost = killed_s + rerun_s - full
    result = {
        "posters": args.posters, "shard_rows": args.shard_rows, "backbone": f"{args.backbone} (random weights)",
        "full_seconds": round(full, 2), "killed_seconds": round(killed_s, 2), "rerun_seconds": round(rerun_s, 2),
        "encoded_at_kill": encoded_at_kill, "committed_at_kill": committed,
        "rerun_encoded": rerun["encoded"], "rerun_encoded_exactly_the_rest": rerun["encoded"] == args.posters - committed,
        "encoded_twice": encoded_at_kill + rerun["encoded"] - args.posters,
        "lost_seconds": round(lost, 2), "lost_in_shards": round(lost / per_shard, 2),
        "all_posters_cached": same,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.posters} posters, shards of {args.shard_rows}, {result['backbone']}")
        print(f"uninterrupted     {full:6.2f} s")
        print(f"killed at {encoded_at_kill} encoded ({committed} committed)  {killed_s:6.2f} s")
        print(f"rerun             {rerun_s:6.2f} s, encoded {rerun['encoded']} "
              f"(exactly the {args.posters - committed} not committed: {result['rerun_encoded_exactly_the_rest']})")
        print(f"encoded twice     {result['encoded_twice']} posters (at most one shard: {args.shard_rows})")
        print(f"time lost         {lost:6.2f} s = {result['lost_in_shards']} shards' worth "
              f"(process start and model load included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
