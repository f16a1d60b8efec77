"""The ``finetune`` cluster verbs against a broken or hostile kubeconfig or TLS setup (a token with a newline, a
server without a scheme, a tokenFile that is a FIFO, an exec plugin that fails, a CA that did not sign the server's
certificate, a kubeconfig from a pipe), run against a real local HTTP server (``tests.support.api_server``): one line on
stderr naming what failed and what to check, never a traceback or a hang, and no credential sent where it should not."""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import pytest

from finetune_operator.cli import main
from tests.support.api_server import GOOD, Api, kubeconfig, one_line

pytestmark = pytest.mark.timeout(30)


def _authorization(api: Api) -> str | None:
    return next((v for k, v in api.requests[-1][2].items() if k.lower() == "authorization"), None)


@pytest.mark.parametrize(
    "user",
    [{"token": "abc\n"}, {"token": " abc \r\n"}, {"tokenFile": "token"}],
    ids=["token", "token-crlf", "token-file"],
)
def test_a_token_ending_with_a_newline_is_trimmed_as_kubectl_does(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], user: dict[str, str]
) -> None:
    """``echo $TOKEN > token`` writes a newline after it: the header was 'Bearer abc\\n', a ValueError dump."""
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url, user)))
    api.answer(GOOD)
    assert main(["get", "j"]) == 0, capsys.readouterr().err
    assert _authorization(api) == "Bearer abc"


def test_a_token_with_a_line_break_inside_is_one_line(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url, {"token": "abc\r\nX-Evil: 1"})))
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and "token" in err and "control character" in err
    assert api.requests == []


def test_a_server_without_a_scheme_is_https_as_for_kubectl(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``server: host:6443``: kubectl speaks TLS to it; urllib3 took it for plain HTTP, sent the token in clear and
    printed a FutureWarning with its source line."""
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url.removeprefix("http://"))))
    api.answer(GOOD)
    code, err = one_line(["get", "j"], capsys)  # the test server speaks plain HTTP: the TLS handshake fails
    assert code == 4 and "TLS with the API server https://127.0.0.1:" in err
    assert api.requests == []  # no request in clear, no token


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("section", "field", "target"),
    [
        ("users", "tokenFile", "fifo"),
        ("users", "tokenFile", "/dev/zero"),
        ("users", "client-certificate", "fifo"),
        ("clusters", "certificate-authority", "/dev/zero"),
    ],
)
def test_a_named_file_that_is_a_pipe_or_a_device_is_one_line(
    api: Api,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    section: str,
    field: str,
    target: str,
) -> None:
    """A tokenFile that is a FIFO hung the CLI for ever (the library reads it whole); /dev/zero filled the memory."""
    os.mkfifo(tmp_path / "fifo")
    path = kubeconfig(tmp_path / "kubeconfig", api.url)
    document = json.loads(path.read_text())
    entry = document[section][0]["user" if section == "users" else "cluster"]
    entry[field] = target  # relative: to the kubeconfig's folder
    path.write_text(json.dumps(document))
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith(f"error: the kubeconfig {path} cannot be used: ")
    assert f"'s {field} {target} is not a regular file" in err
    assert api.requests == []


@pytest.mark.parametrize(
    ("script", "said"),
    [
        ("echo 'token expired, run login' >&2; exit 3", "exec: process returned 3. token expired, run login"),
        ("echo 'not json'", "exec: failed to decode process output"),
        ("echo '[1, 2]'", "exec: malformed response"),
    ],
    ids=["fails", "garbage", "not-an-object"],
)
def test_an_exec_plugin_that_fails_is_one_line_and_nothing_is_sent(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, said: str
) -> None:
    """The library logged the plugin's failure ("ERROR:root:..." through a logging set up on the spot) and sent the
    request without credentials: two lines, the second a 401 saying to log in again, whatever the plugin said."""
    plugin = tmp_path / "plugin"
    plugin.write_text(f"#!/bin/sh\n{script}\n")
    plugin.chmod(0o755)
    user = {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": str(plugin)}}
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig(tmp_path / "kubeconfig", api.url, user)))
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh `finetune` process
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith("error: the kubeconfig's user cannot be logged in: its exec plugin said: ")
    assert said in err and api.requests == []


def test_a_server_certificate_the_kubeconfig_does_not_trust_is_one_line_saying_what_to_check(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A self-signed certificate, or one of another cluster: the line was urllib3's nested repr of MaxRetryError,
    SSLError and SSLCertVerificationError, and said neither that TLS failed nor what to check."""
    import base64
    import ssl
    from datetime import datetime, timezone

    from finetune_operator import certificates

    now = datetime.now(timezone.utc)
    served, other = certificates.issue("127.0.0.1", now), certificates.issue("127.0.0.1", now)
    (tmp_path / "chain.pem").write_bytes(served.chain)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "chain.pem")
    api.http.socket = context.wrap_socket(api.http.socket, server_side=True)
    path = kubeconfig(tmp_path / "kubeconfig", api.url.replace("http://", "https://"))
    document = json.loads(path.read_text())
    document["clusters"][0]["cluster"]["certificate-authority-data"] = base64.b64encode(other.ca).decode()
    path.write_text(json.dumps(document))
    monkeypatch.setenv("KUBECONFIG", str(path))
    code, err = one_line(["get", "j"], capsys)
    assert code == 4 and err.startswith("error: get FineTuneJob ns/j: TLS with the API server https://127.0.0.1:")
    assert "certificate verify failed" in err and "certificate-authority" in err and "HTTPSConnectionPool" not in err


@pytest.mark.timeout(15)
def test_a_kubeconfig_from_a_pipe_is_read_once(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--kubeconfig <(vault read ...)`` (kubectl takes it): the file was read three times, and a pipe gives its
    content once: "Invalid kube-config. /dev/fd/63 file is empty"."""
    text = kubeconfig(tmp_path / "kubeconfig", api.url).read_bytes()
    readable, writable = os.pipe()
    threading.Thread(target=lambda: (os.write(writable, text), os.close(writable)), daemon=True).start()
    api.answer(GOOD)
    try:
        assert main(["get", "j", "--kubeconfig", f"/dev/fd/{readable}"]) == 0, capsys.readouterr().err
    finally:
        os.close(readable)
    assert len(api.requests) == 1
