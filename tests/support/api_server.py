"""A real local HTTP server that plays a hostile or broken Kubernetes API server for the ``finetune`` cluster verbs
(``Api``: each request answered as the test says, or not at all), the kubeconfig that points at it, and the check
that a verb ended in exactly one line on stderr (``one_line``)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.cli import main
from tests.support.schemas import REPO

JOB: dict[str, Any] = {
    "apiVersion": "finetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "j", "namespace": "ns", "creationTimestamp": "2024-01-01T00:00:00Z"},
    "spec": {"model": {"name": "resnet18"}},
}


class Api:
    """Answers each request as ``answer`` said for the longest part of its path given there (``""``: any request);
    ``requests``: (method, path, headers) seen."""

    def __init__(self) -> None:
        self.replies: dict[str, tuple[int, dict[str, str], bytes]] = {"": (200, {"Content-Type": "application/json"}, b"{}")}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.closing = threading.Event()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                api.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = api.replies[max((p for p in api.replies if p in self.path), key=len)]
                if status == 0:  # silent: the connection open, no byte of an answer, until the test ends
                    api.closing.wait(30)
                    return
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PATCH = do_DELETE = answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def answer(
        self, body: Any, status: int = 200, content_type: str = "application/json", path: str = "", **headers: str
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.replies[path] = (status, {"Content-Type": content_type, **headers}, data)


def kubeconfig(path: Path, server: str, user: dict[str, Any] | None = None) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u", "namespace": "ns"}}],
                "clusters": [{"name": "k", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "SECRET"} if user is None else user}],
            }
        )
    )
    return path


GOOD: dict[str, Any] = {
    **yaml.safe_load((REPO / "manifests" / "examples" / "digits-cpu.yaml").read_text()),
    "metadata": {"name": "j", "namespace": "ns", "creationTimestamp": "2024-01-01T00:00:00Z", "uid": "u1"},
}


def one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit code, the one line on stderr) of ``finetune ARGV``; fails on a traceback or more lines."""
    code = main(argv)
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return code, err.strip()
