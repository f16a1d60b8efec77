"""Names and labels of the objects the operator creates for a FineTuneJob: deterministic, short enough, valid.

Deterministic names are what make creation idempotent: a retried or restarted handler computes the same
name, gets HTTP 409, and reads the existing object instead of creating a second one.

The RayJob name is the tight one. KubeRay v1.7.0 rejects RayJob names longer than 47 characters
(``MaxRayJobNameLength = MaxRayClusterNameLength - 6``: the RayCluster is named ``<rayjob>-<5 random>``
and its longest service, ``<cluster>-serve-svc``, must stay a 63-character DNS label) and names that are
not DNS-1035 labels (lower-case letter first). A FineTuneJob name is a DNS-1123 *subdomain* of up to 253
characters that may start with a digit and contain dots, so it is mapped to ``ftj-<name, dots → dashes,
cut to fit>-<11 base-32 characters of sha256(name)>``: at most 47 characters, starts with a letter, and
two names that share their first 31 characters still differ.

The hash is 55 bits, so that collisions stay negligible where they matter most: a sweep of jobs whose
names differ only past the cut. Among 100,000 such names in one namespace the chance of any collision is
about n²/2⁵⁶ ≈ 1.4·10⁻⁷ (five hex characters, 20 bits, gave 38 % at 1,000). Should one happen anyway, the
reconciler sees a child owned by another job of a different name and fails the job with reason
``NameCollision`` instead of waiting for it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Final

RAYJOB_NAME_MAX: Final = 47  # KubeRay v1.7.0 utils.MaxRayJobNameLength
RAYJOB_PREFIX: Final = "ftj-"
HASH_LEN: Final = 11  # base-32 characters: 55 bits (see the module docstring)
OBJECT_NAME_MAX: Final = 253  # DNS-1123 subdomain: ConfigMap, ServiceAccount, Role, RoleBinding
LABEL_VALUE_MAX: Final = 63
VOLUME_NAME_MAX: Final = 63  # pod volume names are DNS-1123 labels

LABEL_JOB: Final = "finetune.dev/job"
LABEL_JOB_UID: Final = "finetune.dev/job-uid"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "finetune-operator"
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def short_hash(text: str, length: int = HASH_LEN) -> str:
    """The first ``length`` characters of sha256(text) in lower-case base 32 (a-z, 2-7): valid in any DNS name."""
    digest = base64.b32encode(hashlib.sha256(text.encode()).digest()).decode().lower()
    return digest[:length]


def _fit(stem: str, budget: int) -> str:
    """``stem`` cut to ``budget`` characters without a trailing '-' or '.' (a name must end alphanumeric)."""
    return stem[:budget].rstrip("-.")


def rayjob_name(job_name: str) -> str:
    """``ftj-<name>-<hash>``, a DNS-1035 label of at most 47 characters (see the module docstring)."""
    stem = re.sub(r"-+", "-", job_name.lower().replace(".", "-"))
    budget = RAYJOB_NAME_MAX - len(RAYJOB_PREFIX) - 1 - HASH_LEN
    fitted = _fit(stem, budget)
    return f"{RAYJOB_PREFIX}{fitted}-{short_hash(job_name)}" if fitted else f"{RAYJOB_PREFIX}{short_hash(job_name)}"


def child_name(job_name: str, suffix: str, limit: int = OBJECT_NAME_MAX) -> str:
    """``<name>-<suffix>`` when it fits in ``limit``; else the name is cut and a hash keeps it unique."""
    full = f"{job_name}-{suffix}"
    if len(full) <= limit:
        return full
    budget = limit - len(suffix) - HASH_LEN - 2
    return f"{_fit(job_name, budget)}-{short_hash(job_name)}-{suffix}"


def config_map_name(job_name: str) -> str:
    return child_name(job_name, "trainer-config")


def service_account_name(job_name: str) -> str:
    return child_name(job_name, "trainer")


def role_name(job_name: str) -> str:
    return child_name(job_name, "trainer-status")


def label_value(text: str) -> str:
    """``text`` when it is a valid label value (≤ 63 characters), else a cut-and-hashed one that is."""
    if len(text) <= LABEL_VALUE_MAX and _LABEL_VALUE.match(text):
        return text
    budget = LABEL_VALUE_MAX - HASH_LEN - 1
    cut = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:budget].strip("-_.")
    return f"{cut}-{short_hash(text)}" if cut else short_hash(text)


def pvc_volume_name(claim: str) -> str:
    """Pod volume name for a claim: ``pvc-<claim>`` cut to a DNS-1123 label, hashed when cut or when the claim has a
    '.' (a label has none: 'runs.v2' and 'runs-v2' would give one volume name to two claims, and the API server
    refuses a pod with two volumes of one name)."""
    name = f"pvc-{claim.replace('.', '-')}"
    if len(name) <= VOLUME_NAME_MAX and "." not in claim:
        return name
    return f"{_fit(name, VOLUME_NAME_MAX - HASH_LEN - 1)}-{short_hash(claim)}"


# ---- the admission webhook: names the chart and kustomize write and the operator serves and patches
WEBHOOK_NAME: Final = "validate.finetunejobs.finetune.dev"
"""The one webhook of the ValidatingWebhookConfiguration (``webhooks[].name``, what kubectl names in a refusal)."""
WEBHOOK_PATH: Final = "validate-finetunejobs"
"""The URL path the API server posts AdmissionReviews to (``clientConfig.service.path`` without its slash); Kopf routes
a path to the handler whose id it is."""
