# Two entry points on a fresh machine (python3 + pip only):
#   make reproduce   # the main job: the mini reproduction (and the published render)
#   make test        # the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2

.PHONY: clean-paper reproduce published test lint dry-run clean

$(BIN)/webssl-repro: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.version_info >= (3, 11) or sys.exit("webssl-repro needs Python 3.11+ (PYTHON=$(PYTHON) is " + sys.version.split()[0] + "); set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

reproduce: $(BIN)/webssl-repro
	$(BIN)/snakemake --cores $(CORES) all
	$(BIN)/snakemake --cores $(CORES) all --configfile config/published.yaml

published: $(BIN)/webssl-repro
	$(BIN)/snakemake --cores $(CORES) all --configfile config/published.yaml

test: $(BIN)/webssl-repro
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -n $(CORES) --dist loadgroup -q --durations=30

lint: $(BIN)/webssl-repro
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules

dry-run: $(BIN)/webssl-repro
	$(BIN)/snakemake -n all --configfile config/paper.yaml

# The mini scale's outputs and the mini and published renders; the paper scale's runs,
# evaluations and renders (weeks of GPU time on a cluster checkout) only with `make clean-paper`.
# .snakemake/ stays: its records of how every scale's outputs were made are what reruns a
# job whose code or params changed (a record of a removed output is unused).
clean:
	rm -rf paper/mini paper/published results/mini logs/mini logs/published

clean-paper:
	rm -rf paper/paper results/paper logs/paper
