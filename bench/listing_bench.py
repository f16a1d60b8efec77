"""Listing benchmark: how long the streaming path takes to list an object-store ImageFolder, one sequential
``fs.find`` of the whole prefix (the listing before issue 14's fix) next to today's ``listing._find_all`` (the
class folders, then each folder's ``find``, ``LISTING_CONCURRENCY`` at once), in one run, the two alternating.

This script owns the "Listing an object store" numbers of ``bench/README.md``. Both sides run the trainer's
``listing.list_image_folder`` (the "before" side with ``_find_all`` replaced by one ``fs.find``) against moto's S3
server in a child process, on a bucket of ``--objects`` empty objects in ``--classes`` class folders; each side's
result is checked to be the other's. It prints seconds and ratios and asserts nothing about speed.

``--latency-ms`` (e.g. ``0,100``) makes the server hold each listing request (ListObjectsV2) that long before
answering, in the request's own server thread, as a distant store would: a model of a real store's round trip,
not a measurement of one. The server also counts the listing requests and the most it had in flight at once.

Run from the repository root: ``.venv/bin/python bench/listing_bench.py`` (``--quick``: 600 objects, to check the
script end to end).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for _sub in ("trainer", "operator"):  # self-contained: the checkout's packages, no install needed
    if str(REPO / _sub) not in sys.path:
        sys.path.insert(0, str(REPO / _sub))

BUCKET = "listing"


# ---------------------------------------------------------------------------------------------- the server (child)
def serve() -> None:
    """``--serve``: moto's S3 server on a free port, its endpoint on the first line of stdout; then one command a
    line on stdin: ``latency MS`` sets the hold of each listing request, ``stats`` prints ``requests peak`` (since
    the last ``stats``); end of input stops it."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    lock, state = threading.Lock(), {"hold": 0.0, "requests": 0, "in_flight": 0, "peak": 0}

    def held(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ["REQUEST_METHOD"] != "GET" or "list-type=2" not in environ.get("QUERY_STRING", ""):
            return app(environ, start_response)
        with lock:
            state["requests"] += 1
            state["in_flight"] += 1
            state["peak"] = max(state["peak"], state["in_flight"])
        try:
            time.sleep(state["hold"])
            return app(environ, start_response)
        finally:
            with lock:
                state["in_flight"] -= 1

    server = make_server("127.0.0.1", 0, held, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{server.server_port}", flush=True)
    for line in sys.stdin:
        command, *value = line.split()
        with lock:
            if command == "latency":
                state["hold"] = float(value[0]) / 1000
                print("ok", flush=True)
            else:
                print(state["requests"], state["peak"], flush=True)
                state["requests"] = state["peak"] = 0
    server.shutdown()


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # one log line per request
            text=True,
        )
        self.endpoint = self._ask(None)
        if not self.endpoint.startswith("http"):
            raise RuntimeError(f"moto server did not start: {self.endpoint!r}")

    def _ask(self, command: str | None) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if command is not None:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def latency(self, ms: float) -> None:
        self._ask(f"latency {ms}")

    def stats(self) -> tuple[int, int]:
        requests, peak = self._ask("stats").split()
        return int(requests), int(peak)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- the two sides
def upload(client: Any, objects: int, classes: int) -> float:
    def put(i: int) -> None:
        client.put_object(Bucket=BUCKET, Key=f"data/c{i % classes:04d}/{i:07d}.jpg", Body=b"")

    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(objects)))
    return time.perf_counter() - started


@contextmanager
def one_find() -> Iterator[None]:
    """The listing as it was before: one ``fs.find`` of the whole prefix, the same rules applied to it."""
    from finetune_trainer import listing

    today = listing._find_all
    listing._find_all = lambda fs, prefix: fs.find(prefix)
    try:
        yield
    finally:
        listing._find_all = today


def timed(side: str, uri: str) -> tuple[float, Any]:
    from finetune_trainer import listing

    started = time.perf_counter()
    if side == "one find":
        with one_find():
            result = listing.list_image_folder("trainUri", uri)
    else:
        result = listing.list_image_folder("trainUri", uri)
    return time.perf_counter() - started, result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=20, help="class folders (20: 1,000 objects each, as ImageNet's ~1,300)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--latency-ms", default="0,100", help="hold of each listing request by the server, per round")
    p.add_argument("--quick", action="store_true", help="600 objects: checks the script, measures nothing")
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.quick:
        args.objects, args.reps = 600, 1
    load = os.getloadavg()
    print(f"listing bench: load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}, {os.cpu_count()} CPUs", flush=True)
    server = Server()
    try:
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": server.endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        import boto3

        client = boto3.client("s3", endpoint_url=server.endpoint)
        client.create_bucket(Bucket=BUCKET)
        seconds = upload(client, args.objects, args.classes)
        print(f"uploaded {args.objects} objects in {args.classes} class folders in {seconds:.1f} s", flush=True)
        uri = f"s3://{BUCKET}/data"
        from finetune_trainer.listing import LISTING_CONCURRENCY

        for side in ("one find", "per class"):  # warm-up, not recorded: the first call opens s3fs's session
            timed(side, uri)
        for ms in (float(x) for x in args.latency_ms.split(",")):
            server.latency(ms)
            times: dict[str, list[float]] = {"one find": [], "per class": []}
            reference = None
            for rep in range(args.reps):
                sides = ["one find", "per class"] if rep % 2 == 0 else ["per class", "one find"]
                for side in sides:
                    server.stats()  # resets the counts
                    elapsed, result = timed(side, uri)
                    requests, peak = server.stats()
                    reference = reference or result
                    assert result == reference, f"{side} listed something else"
                    times[side].append(elapsed)
                    print(
                        f"  latency {ms:>5.0f} ms rep {rep + 1} {side:<9}: {elapsed:6.2f} s, {requests:>4} listing "
                        f"requests, at most {peak} in flight ({len(result[1])} images, {len(result[0])} classes)",
                        flush=True,
                    )
            before, after = (statistics.median(times[s]) for s in ("one find", "per class"))
            print(
                f"latency {ms:.0f} ms: one find {before:.2f} s, per class ({LISTING_CONCURRENCY} at once) {after:.2f} s "
                f"(medians of {args.reps}): {before / after:.2f}x faster",
                flush=True,
            )
    finally:
        server.close()
    load = os.getloadavg()
    print(f"load average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
