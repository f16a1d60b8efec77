"""``python -m finetune_trainer --config <json|path>``: the RayJob's entrypoint.

The operator renders the job's ``TrainerConfig`` as JSON (inline, or a file mounted from a ConfigMap);
this joins the RayJob's Ray cluster (``ray.init()`` follows ``RAY_ADDRESS``) and runs the driver.
Exit status: 0 done, 2 a user error (``error: <one line>``, also in the job's status), else a bug.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError

from finetune_operator.api.contract import TrainerConfig
from finetune_operator.api.errors import format_errors
from finetune_trainer.errors import TrainerError
from finetune_trainer.gate import check_accuracy_gate


def load_config(value: str) -> TrainerConfig:
    """A TrainerConfig from inline JSON (starts with ``{``) or a JSON file's path."""
    text = value if value.lstrip().startswith("{") else None
    if text is None:
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise TrainerError(f"--config: {value}: cannot read: {e.strerror or e}") from None
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as e:
        raise TrainerError(f"--config: not a valid trainer config: {'; '.join(format_errors(e, TrainerConfig))}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune_trainer", description="Run one FineTuneJob on the current Ray cluster."
    )
    parser.add_argument("--config", required=True, help="the TrainerConfig as JSON, or the path of a JSON file")
    args = parser.parse_args(argv)
    # An entry point configures logging; the library modules only log.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config)
        import ray

        from finetune_trainer import driver

        ray.init()
        result = driver.run(cfg)
        check_accuracy_gate(cfg.spec, result.best_val_accuracy, result.best_epoch, result.run_dir, result.shipped_accuracy)
    except TrainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{result.job_name}: val accuracy {result.val_accuracy}, best {result.best_val_accuracy} "
        f"(epoch {result.best_epoch}); artifacts in {result.run_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
