# Convenience targets; the README's two commands are scripts/demo.sh and scripts/test.sh.
.PHONY: setup demo test unit integration lint crd catalog
setup: ; scripts/setup.sh
demo: ; scripts/demo.sh
test: ; scripts/test.sh
# The tiers: unit (no Ray, no emulator, no Kopf), integration (API emulator over HTTP, Kopf), slow (Ray), e2e (a cluster).
unit: setup ; .venv/bin/python -m pytest -m "not slow and not e2e and not integration" -x -q
integration: setup ; .venv/bin/python -m pytest -m integration -x -q
lint: setup ; scripts/lint.sh
crd: setup ; .venv/bin/python scripts/sync_crd.py
catalog: setup ; .venv/bin/python -m finetune_trainer.catalog_export --write
