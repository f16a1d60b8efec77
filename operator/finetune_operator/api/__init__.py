"""The FineTuneJob API (finetune.dev/v1alpha1): typed models, catalogue, CRD generation, error messages.

Needs only pydantic and PyYAML, so the operator, the CLI and the trainer all import it.
"""

from finetune_operator.api.v1alpha1 import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus

__all__ = ["FineTuneJob", "FineTuneJobSpec", "FineTuneJobStatus"]
