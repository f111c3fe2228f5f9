# Set-up and entry points. `make demo` and `make test` create the project venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CORES  ?= 2

.PHONY: install demo test test-fast vocsample clean-results

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

## only the project venv (.venv) from pyproject.toml
install: $(BIN)/.installed

## the main job on the embedded synthetic `demo` dataset (ACR chain), then its mIoU summary
## (+ its report figures and the one-file HTML report, report.html)
demo: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES) results/demo/acr/miou.json results/demo/acr/report/iou.html
	$(BIN)/python -m pipeline.summary results/demo/acr/miou.json
	$(BIN)/snakemake --cores $(CORES) --report report.html results/demo/acr/report/iou.html

## the same chain on the 100 real VOC images in ../shared/data/voc2012-sample
vocsample: $(BIN)/.installed
	$(BIN)/snakemake --cores $(CORES) results/vocsample/acr/miou.json results/vocsample/cam/miou.json
	$(BIN)/python -m pipeline.summary results/vocsample/acr/miou.json results/vocsample/cam/miou.json

## the test suite (unit + end-to-end tests; CI runs exactly this)
test: $(BIN)/.installed
	$(BIN)/python -m pytest

test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -m "not slow"

clean-results:
	rm -rf results .snakemake
