"""The base model every wire object derives from: camelCase on the wire, snake_case in Python.

Unknown fields are rejected (``extra="forbid"``) so that a typo such as ``learningrate`` is an error,
not a silently ignored setting — the same behaviour the CRD's structural schema gives at admission.

Input is read by alias only: ``model_validate`` (manifests, API objects, JSON files) refuses
``learning_rate`` because the CRD declares only ``learningRate`` and the API server would prune the
snake_case key, so a job that validates here would silently lose the setting on a cluster. Python code
keeps its field names: ``HyperparametersSpec(learning_rate=0.1)`` works, because keyword construction
goes through ``__init__``, which the model configuration lets populate by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:  # typing.Self is Python 3.11+; pydantic itself depends on typing_extensions
    from typing_extensions import Self


class WireModel(BaseModel):
    """A Kubernetes-style object: camelCase aliases, unknown keys rejected; Python field names in ``__init__`` only."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=True,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> Self:
        """Validate a mapping read from the wire: camelCase keys only, unless ``by_name=True`` is passed."""
        return super().model_validate(obj, **_by_alias(options))

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **options: Any) -> Self:
        """Validate JSON read from the wire: camelCase keys only, unless ``by_name=True`` is passed."""
        return super().model_validate_json(json_data, **_by_alias(options))

    @classmethod
    def model_validate_strings(cls, obj: Any, **options: Any) -> Self:
        """Validate string data read from the wire: camelCase keys only, unless ``by_name=True`` is passed."""
        return super().model_validate_strings(obj, **_by_alias(options))

    def to_wire(self) -> dict[str, object]:
        """The object as it is written to the API server: camelCase keys, unset optionals left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _by_alias(options: dict[str, Any]) -> dict[str, Any]:
    # by_name applies to the whole validation, nested models included: one snake_case key anywhere is refused.
    return options if options.get("by_name") is not None else {**options, "by_name": False}
