"""finetune-operator: the FineTuneJob API, the Kopf operator that runs it on KubeRay, and the `finetune` CLI.

Importing this package is cheap and side-effect free: the API models need only pydantic, the
operator runtime (Kopf, the kubernetes client) is imported by `finetune_operator.handlers` alone.
"""

__version__ = "0.1.0"
