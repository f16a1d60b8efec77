"""A real S3 API on localhost for the tests: moto's server mode, reached through ``AWS_ENDPOINT_URL`` as a trainer
pod reaches MinIO or another S3-compatible store, with the same s3fs and boto3 code a cluster runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest


@dataclass(frozen=True)
class S3:
    endpoint: str
    client: Any  # boto3's S3 client, for arranging objects and reading their headers
    requests: list[str] = field(default_factory=list)  # "METHOD /path?query" of every request the server answered

    def listings(self) -> int:
        """How many object listings (ListObjects, V1 or V2: a GET of a bucket) the server answered so far."""
        return sum(1 for r in self.requests if r.startswith("GET ") and _is_bucket_listing(r))


def _is_bucket_listing(request: str) -> bool:
    path, _, query = request.split(" ", 1)[1].partition("?")
    # Path-style: /bucket or /bucket/ with list parameters; an object GET has a key after the bucket.
    return path.strip("/").count("/") == 0 and path.strip("/") != "" and ("list-type" in query or "prefix" in query)


def _counting(app: Any, log: list[str]) -> Any:
    def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
        query = environ.get("QUERY_STRING", "")
        log.append(f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO', '')}{'?' + query if query else ''}")
        return app(environ, start_response)

    return wrapped


@contextmanager
def s3_server(*buckets: str) -> Iterator[S3]:
    """moto's S3 server on a free port, the AWS_* variables pointing at it, ``buckets`` created."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
    requests: list[str] = []
    # werkzeug reads the server's app for every request: counting them is one wrapper, no proxy.
    server._server.app = _counting(server._server.app, requests)  # type: ignore[union-attr]
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        # s3fs keeps one filesystem per set of arguments, not per environment: one made while another test's
        # (now stopped) server was configured would be handed back here.
        s3fs.S3FileSystem.clear_instance_cache()
        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        try:
            yield S3(endpoint, client, requests)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
