"""Loading a Kubernetes API client: in-cluster credentials in a pod, else the kubeconfig (``KUBECONFIG``).

A leaf module (the kubernetes client only, no Kopf) shared by the operator (``k8s.Kube``) and the trainer's
status reporter, so both find their credentials the same way. The trainer may import it (and the API
layer) but nothing else of the operator; import-linter holds both to that.
"""

from __future__ import annotations

import os
from typing import Any

import kubernetes.client
import kubernetes.config


def load_client(*, retries: int | None = None) -> kubernetes.client.ApiClient:
    """An API client from the pod's service account, or from ``KUBECONFIG`` (read now, not at import).

    ``retries``: urllib3's retry count (None keeps the client's default); 0 for callers that retry themselves.
    """
    configuration = kubernetes.client.Configuration()
    config: Any = kubernetes.config  # untyped functions
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    if retries is not None:
        configuration.retries = retries
    return kubernetes.client.ApiClient(configuration=configuration)
