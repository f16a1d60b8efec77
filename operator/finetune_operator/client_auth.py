"""The credentials of ``FineTuneJobClient``: a pod's service account, else a kubeconfig as kubectl finds it.

Owns ``load_api_client`` and the check that a kubeconfig is safe to hand to the kubernetes library
(``kubeconfig_problem``), which reads it whole with PyYAML's recursive loader. Split from ``client`` to keep
modules short; failures are ``ClientError`` (one line, exit 4 in the CLI).
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Final

import kubernetes.client
import kubernetes.config
import urllib3
import yaml

from finetune_operator.client_errors import ClientError, at

__all__ = ["MAX_KUBECONFIG_BYTES", "kubeconfig_problem", "load_api_client"]

_SA_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

MAX_KUBECONFIG_BYTES: Final = 4 << 20
"""Largest kubeconfig handed to the kubernetes library (4 MiB: hundreds of clusters with their certificates)."""
RETRIES: Final = urllib3.util.Retry(total=3, read=0, redirect=False, respect_retry_after_header=False)
"""How a request is sent again: a failed connection is (urllib3's default); a request sent is not, nor one answered.
urllib3's default slept a 429's or 503's Retry-After out, however long it said (1e9 s hung the CLI), read a bad one as a
dead server, and sent a request a silent server did not answer three times more (a 30 s read timeout was two minutes).
A redirect is not followed (an API server never sends one): a 307 sent a PATCH or DELETE, body and all, to any host."""
MAX_REFERENCED_BYTES: Final = 1 << 20
"""Largest token, certificate or key file a kubeconfig may name (1 MiB: a certificate chain is a few KiB)."""
# The files a kubeconfig names that the library reads whole: (section, entry key, fields).
_FILE_FIELDS: Final = (
    ("users", "user", ("tokenFile", "client-certificate", "client-key")),
    ("clusters", "cluster", ("certificate-authority",)),
)
_KUBECONFIG_DEPTH: Final = 64
_KUBECONFIG_VALUES: Final = 100_000


def kubeconfig_problem(path: str) -> str | None:
    """What makes the kubeconfig at ``path`` unsafe to hand to the kubernetes library, which reads it whole with
    PyYAML's recursive pure-Python loader: too big (minutes), too deep (a RecursionError dump) or aliases that expand
    past reason (a billion laughs held gigabytes). None when it is fine, or unreadable (the library says why)."""
    try:
        with Path(path).expanduser().open("rb") as stream:
            data = stream.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError:
        return None
    if len(data) > MAX_KUBECONFIG_BYTES:
        return f"it is larger than {MAX_KUBECONFIG_BYTES >> 20} MiB; a kubeconfig is a few KiB"
    # PyYAML's pure-Python parser, the library's own (iterative: only building the objects recurses), so that a file
    # it would read is never refused here; libyaml's stops at 1,000 levels with an error that leaves the file unread.
    try:
        loader = yaml.SafeLoader(data)  # its reader checks the first bytes already
    except yaml.YAMLError:
        return None  # not text: the library's own error says so
    # (anchor, values before the collection) per open collection; an alias counts the values of what it names.
    open_: list[tuple[str | None, int]] = []
    sizes: dict[str, int] = {}
    values = 0
    try:
        while loader.check_event():
            event = loader.get_event()  # type: ignore[no-untyped-call]  # types-PyYAML leaves it untyped
            if isinstance(event, yaml.AliasEvent):
                values += sizes.get(event.anchor or "", 1)
            elif isinstance(event, yaml.CollectionEndEvent):
                anchor, before = open_.pop()
                if anchor is not None:
                    sizes[anchor] = values - before
            elif isinstance(event, yaml.NodeEvent):
                values += 1
                if isinstance(event, yaml.CollectionStartEvent):
                    open_.append((event.anchor, values - 1))
                    if len(open_) > _KUBECONFIG_DEPTH:
                        line = event.start_mark.line + 1 if event.start_mark is not None else 0
                        return f"nested more than {_KUBECONFIG_DEPTH} levels deep at line {line}; a kubeconfig nests five"
                elif event.anchor is not None:
                    sizes[event.anchor] = 1
            if values > _KUBECONFIG_VALUES:
                return f"it holds more than {_KUBECONFIG_VALUES} values (aliases counted in full); a kubeconfig holds hundreds"
    except yaml.YAMLError:
        return None  # broken YAML: the library's own error says where
    finally:
        loader.dispose()
    return _named_file_problem(yaml.safe_load(data), Path(path).expanduser().parent)


def _named_file_problem(document: Any, base: Path) -> str | None:
    """What makes a file the kubeconfig names unsafe to read whole: a FIFO hung the CLI for ever, /dev/zero filled the
    memory. A file that is missing is no problem here (the library says so, when that entry is the one used)."""
    for section, inner, fields in _FILE_FIELDS:
        entries = at(document, section)
        for entry in entries if isinstance(entries, list) else []:
            for field in fields:
                name = at(entry, inner, field)
                if not isinstance(name, str) or not name:
                    continue
                try:
                    info = (base / Path(name).expanduser()).stat()
                except OSError:
                    continue
                where = f"{section[:-1]} {at(entry, 'name')}'s {field} {name}"
                if not stat.S_ISREG(info.st_mode):
                    return f"{where} is not a regular file (a pipe or a device); name the file that holds it"
                if info.st_size > MAX_REFERENCED_BYTES:
                    return f"{where} is larger than {MAX_REFERENCED_BYTES >> 20} MiB; a token or certificate is a few KiB"
    return None


def _clean_token(configuration: kubernetes.client.Configuration) -> None:
    """The bearer token trimmed as kubectl trims a token file (``echo $TOKEN > token`` ends it with a newline, which
    http.client refused with a ValueError dump); ClientError when a control character is left inside."""
    token = configuration.api_key.get("BearerToken")
    if not isinstance(token, str):
        return
    scheme, _, value = token.partition(" ")
    value = value.strip()
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise ClientError(
            "the kubeconfig's user token holds a line break or another control character; "
            "write the token alone (token or tokenFile), or log in again"
        )
    configuration.api_key["BearerToken"] = f"{scheme} {value}"


def _clean_host(configuration: kubernetes.client.Configuration) -> None:
    """``server: host:6443`` as kubectl reads it, TLS; urllib3 spoke plain HTTP to it, the token in clear."""
    if configuration.host and "://" not in configuration.host:
        configuration.host = f"https://{configuration.host}"


def _kept_clean(configuration: kubernetes.client.Configuration) -> None:
    """``_clean_token`` and ``_clean_host`` now and after each refresh: with a token, the library sets the token and
    the host again from the kubeconfig before every request."""
    hook = configuration.refresh_api_key_hook
    if hook is not None:

        def refresh(c: kubernetes.client.Configuration) -> None:
            hook(c)
            _clean_token(c)
            _clean_host(c)

        configuration.refresh_api_key_hook = refresh
    _clean_token(configuration)
    _clean_host(configuration)


class _Said(logging.Handler):
    """The errors the library logs while it loads credentials: an exec plugin's failure is only logged (on a logging
    set up on the spot, "ERROR:root:..."), and the requests then went without credentials."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def load_api_client(*, context: str | None = None, config_file: str | None = None) -> tuple[kubernetes.client.ApiClient, str]:
    """(client, default namespace): the pod's service account in a pod (unless a context is asked for), else the
    kubeconfig (``config_file``, ``KUBECONFIG``, ``~/.kube/config``) at ``context`` (None: its current one)."""
    configuration = kubernetes.client.Configuration()
    configuration.retries = RETRIES
    config: Any = kubernetes.config  # untyped functions
    if context is None and config_file is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            namespace = _SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.exists() else "default"
            return kubernetes.client.ApiClient(configuration=configuration), namespace or "default"
        except config.ConfigException:
            pass
    path = config_file or os.environ.get("KUBECONFIG")
    with tempfile.TemporaryDirectory(prefix="finetune-kubeconfig-") as scratch:
        # KUBECONFIG and --kubeconfig may both list files (kubectl's PATH-like list); the library reads each in full.
        files: list[str] = []
        for one in (path or "~/.kube/config").split(os.pathsep):
            copy = _copy_of_pipe(one, Path(scratch) / str(len(files))) if one else None
            if one and (problem := kubeconfig_problem(copy or one)):
                raise ClientError(f"the kubeconfig {one} cannot be used: {problem}")
            files.append(copy or one)
        loaded = os.pathsep.join(files) if files != (path or "~/.kube/config").split(os.pathsep) else path
        contexts, current = _load(configuration, loaded, context, path or "~/.kube/config")
    _kept_clean(configuration)
    chosen = next((c for c in contexts if c.get("name") == context), current) if context else current
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return kubernetes.client.ApiClient(configuration=configuration), str(namespace)


def _copy_of_pipe(path: str, copy: Path) -> str | None:
    """A copy of the kubeconfig at ``path`` when it is a pipe (``--kubeconfig <(vault read ...)``, /dev/stdin), else
    None: it is read here and twice by the library, and a pipe gives its content once ("file is empty")."""
    try:
        if stat.S_ISREG((source := Path(path).expanduser()).stat().st_mode):
            return None
        with source.open("rb") as stream:
            copy.write_bytes(stream.read(MAX_KUBECONFIG_BYTES + 1))
    except OSError:
        return None  # missing, a folder: the library says so
    return str(copy)


def _load(configuration: kubernetes.client.Configuration, path: str | None, context: str | None, where: str) -> Any:
    """The library's load of the kubeconfig(s) at ``path`` into ``configuration``: (contexts, current context)."""
    config: Any = kubernetes.config  # untyped functions
    said, root = _Said(), logging.getLogger()
    root.addHandler(said)
    try:
        config.load_kube_config(config_file=path, context=context, client_configuration=configuration)
        contexts, current = config.list_kube_config_contexts(config_file=path)
    except (config.ConfigException, OSError) as exc:
        raise ClientError(f"no Kubernetes credentials: not in a pod, and the kubeconfig cannot be used: {exc}") from None
    except (yaml.YAMLError, TypeError, AttributeError, KeyError, ValueError) as exc:
        # A file that is not a kubeconfig at all (a string, a list, broken YAML, base64 that is not): the library
        # trips over it with whatever its code meets first.
        detail = (str(exc).splitlines() or [""])[0][:200]
        raise ClientError(
            f"the kubeconfig {where} cannot be used: it is not a valid kubeconfig ({type(exc).__name__}: {detail})"
        ) from None
    finally:
        root.removeHandler(said)
    if said.lines:
        first = (said.lines[0].splitlines() or [""])[0][:300]
        raise ClientError(
            f"the kubeconfig's user cannot be logged in: its exec plugin said: {first}; run the plugin by hand to see why"
        )
    return contexts, current
