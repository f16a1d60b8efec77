# Convenience targets; the README's two commands are scripts/demo.sh and scripts/test.sh.
.PHONY: setup demo test unit lint crd catalog
setup: ; scripts/setup.sh
demo: ; scripts/demo.sh
test: ; scripts/test.sh
unit: setup ; .venv/bin/python -m pytest -m "not slow and not e2e" -x -q
lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy operator/finetune_operator trainer/finetune_trainer && .venv/bin/lint-imports --no-cache
crd: setup ; .venv/bin/python scripts/sync_crd.py
catalog: setup ; .venv/bin/python -m finetune_trainer.catalog_export --write
