"""``python -m finetune_operator.smoke``: the chart's ``helm test``, run in the operator's image by a hook pod.

Three checks, each one line on stdout (``ok: ...``) or stderr (``FAILED: ...``), exit status 1 when any failed:

1. the FineTuneJob API is served (a LIST of one job in the namespace: 404 means no CRD);
2. a valid FineTuneJob is admitted by a server-side dry-run create (schema, CEL rules and the webhook all pass it);
3. with ``--webhook``: an invalid one is refused by the operator's admission webhook (not by the CRD's schema), which
   proves the operator answers — with ``failurePolicy: Ignore`` a webhook that is down lets everything through.

Dry runs only: nothing is stored, and the webhook is declared ``sideEffects: None``, so the API server calls it for dry
runs too. The hook pod's Role grants ``list`` and ``create`` on finetunejobs in one namespace and nothing else.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from finetune_operator import naming
from finetune_operator.api.versions import GROUP, KIND, PLURAL, VERSION

VALID: Final[dict[str, Any]] = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": KIND,
    "metadata": {"name": "helm-test-valid"},
    "spec": {
        "model": {"name": "resnet18", "weights": None},
        "dataset": {"format": "digits", "imageSize": 32, "validationSplit": 0.25, "loaderWorkers": 0},
        "hyperparameters": {"epochs": 1, "batchSize": 64},
        "resources": {"workers": 1, "cpusPerWorker": 1, "memoryPerWorker": "2Gi"},
        "output": {"uri": "pvc://finetune-runs/helm-test"},
    },
}
"""A job every operator admits (the offline digits example, one CPU worker); never stored: dry runs only."""


def invalid_job() -> dict[str, Any]:
    """A job the CRD's schema and CEL rules accept but the operator refuses: 1024 workers of 16 GPUs each, past its
    limits (FINETUNE_OPERATOR_MAX_WORKERS is at most 1024, FINETUNE_OPERATOR_MAX_GPUS_PER_WORKER at most 16, and an
    operator allowing both maxima is refused nothing here: the check then says so)."""
    job = copy.deepcopy(VALID)
    job["metadata"]["name"] = "helm-test-invalid"
    job["spec"]["resources"] = {"workers": 1024, "gpusPerWorker": 16, "cpusPerWorker": 1, "memoryPerWorker": "2Gi"}
    job["spec"]["hyperparameters"]["batchSize"] = 1024 * 16  # one image per GPU: the CRD asks for a multiple of them
    return job


class Refused(Exception):
    """The API server answered with an error: its HTTP status and its message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


class JobsApi(Protocol):
    """The two calls the checks make; each raises ``Refused``."""

    def list_one(self, namespace: str) -> None: ...

    def dry_run_create(self, namespace: str, body: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class Outcome:
    ok: bool
    line: str


def check(api: JobsApi, namespace: str, *, webhook: bool) -> list[Outcome]:
    """Every check in order (see the module docstring); the later ones are skipped when the API is not served."""
    try:
        api.list_one(namespace)
    except Refused as exc:
        missing = " (is the CRD installed? crds.enabled)" if exc.status == 404 else ""
        return [Outcome(False, f"the FineTuneJob API {GROUP}/{VERSION} {PLURAL} is not served in {namespace}{missing}: {exc}")]
    outcomes = [Outcome(True, f"the FineTuneJob API {GROUP}/{VERSION} {PLURAL} is served in {namespace}")]
    try:
        api.dry_run_create(namespace, VALID)
        outcomes.append(Outcome(True, "a valid FineTuneJob is admitted (server-side dry run)"))
    except Refused as exc:
        outcomes.append(Outcome(False, f"a valid FineTuneJob was refused (server-side dry run): {exc}"))
    if webhook:
        outcomes.append(_webhook_refuses(api, namespace))
    return outcomes


def _webhook_refuses(api: JobsApi, namespace: str) -> Outcome:
    try:
        api.dry_run_create(namespace, invalid_job())
    except Refused as exc:
        # kubectl's wording of a webhook's denial: 'admission webhook "<name>" denied the request: <message>'.
        if naming.WEBHOOK_NAME in exc.message and 400 <= exc.status < 500:
            return Outcome(True, f"the operator's webhook refuses an invalid FineTuneJob: {exc.message.splitlines()[0]}")
        return Outcome(False, f"an invalid FineTuneJob was refused, but not by the webhook {naming.WEBHOOK_NAME}: {exc}")
    return Outcome(
        False,
        f"an invalid FineTuneJob (1024 workers of 16 GPUs) was admitted: the webhook {naming.WEBHOOK_NAME} did not "
        "answer (with failurePolicy Ignore a webhook that is down admits everything), or the operator's limits allow it",
    )


class KubeJobsApi:
    """``JobsApi`` over the kubernetes client (the pod's service account)."""

    def __init__(self, api_client: Any) -> None:
        import kubernetes.client

        self.api = kubernetes.client.CustomObjectsApi(api_client)
        self.errors: type[Exception] = kubernetes.client.ApiException

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            fn(GROUP, VERSION, *args, **kwargs)
        except self.errors as exc:
            raise Refused(int(getattr(exc, "status", 0) or 0), _message(getattr(exc, "body", None), str(exc))) from exc

    def list_one(self, namespace: str) -> None:
        self._call(self.api.list_namespaced_custom_object, namespace, PLURAL, limit=1)

    def dry_run_create(self, namespace: str, body: Mapping[str, Any]) -> None:
        self._call(self.api.create_namespaced_custom_object, namespace, PLURAL, dict(body), dry_run="All")


def _message(body: Any, fallback: str) -> str:
    """The Status object's message (what kubectl prints), else the client's text."""
    try:
        message = json.loads(body).get("message")
    except (TypeError, ValueError, AttributeError):
        return fallback
    return message if isinstance(message, str) and message else fallback


def main(argv: list[str] | None = None, api: JobsApi | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune_operator.smoke", description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", required=True, help="namespace of the dry runs (one the operator watches)")
    parser.add_argument("--webhook", action="store_true", help="also check that the admission webhook refuses a bad job")
    args = parser.parse_args(argv)
    if api is None:
        from finetune_operator.kubeclient import load_client

        api = KubeJobsApi(load_client(retries=3))
    outcomes = check(api, args.namespace, webhook=args.webhook)
    for outcome in outcomes:
        print(f"ok: {outcome.line}" if outcome.ok else f"FAILED: {outcome.line}", file=sys.stdout if outcome.ok else sys.stderr)
    return 0 if all(outcome.ok for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
