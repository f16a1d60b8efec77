"""A real S3 API on localhost for the tests: moto's server mode, reached through ``AWS_ENDPOINT_URL`` as a trainer
pod reaches MinIO or another S3-compatible store, with the same s3fs and boto3 code a cluster runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class S3:
    endpoint: str
    client: Any  # boto3's S3 client, for arranging objects and reading their headers


@contextmanager
def s3_server(*buckets: str) -> Iterator[S3]:
    """moto's S3 server on a free port, the AWS_* variables pointing at it, ``buckets`` created."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(port=0, verbose=False)
    server.start()
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
            yield S3(endpoint, client)
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()
