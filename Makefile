# Set-up and entry points. `make demo` and `make test` create the project venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= 2

LOCK   := requirements/lock.txt
EXPECTED := tests/expected/demo-acr

.PHONY: install demo check-demo expected lock test test-fast vocsample clean-results

# The venv holds exactly the locked versions (hash-checked, no resolver): every package of
# requirements/lock.txt, then this project without dependencies. A changed lock rebuilds it.
$(BIN)/.installed: $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

## only the project venv (.venv) from the lock
install: $(BIN)/.installed

## regenerate the lock from pyproject.toml + requirements/lock.in (needs uv: `pip install uv`),
## then the rules' conda environment from it (workflow/envs/wsss.yaml)
lock:
	uv pip compile pyproject.toml --all-extras -c requirements/lock.in --generate-hashes \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --index-url https://pypi.org/simple --custom-compile-command "make lock" -o $(LOCK)
	$(PYTHON) requirements/conda_env.py $(LOCK) workflow/envs/wsss.yaml

## the main job on the embedded synthetic `demo` dataset (ACR chain), then its mIoU summary
## (+ its report figures and the one-file HTML report, report.html)
demo: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES) results/demo/acr/miou.json results/demo/acr/report/iou.html
	$(BIN)/python -m pipeline.steps.summary results/demo/acr/miou.json
	$(BIN)/snakemake --cores $(CORES) --report report.html results/demo/acr/report/iou.html

## compare the demo chain's *miou.json with this CPU type's committed record (exact; CI runs it)
check-demo: $(BIN)/.installed
	$(BIN)/python -m pipeline.steps.summary --check $(EXPECTED) results/demo/acr

## record the demo chain's values as this CPU type's expected ones (commit with the README's demo row)
expected: $(BIN)/.installed
	$(BIN)/python -m pipeline.steps.summary --write $(EXPECTED) results/demo/acr

## the same chain on the 100 real VOC images in ../shared/data/voc2012-sample
vocsample: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES) results/vocsample/acr/miou.json results/vocsample/cam/miou.json
	$(BIN)/python -m pipeline.steps.summary results/vocsample/acr/miou.json results/vocsample/cam/miou.json

## the test suite (unit + end-to-end tests; CI runs exactly this)
test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow"

clean-results:
	rm -rf results .snakemake
