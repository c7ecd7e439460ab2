# Two entry points on a fresh machine (python3 + pip only):
#   make reproduce   # the main job: the mini reproduction (and the published render)
#   make test        # the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= 2
# pytest workers: one more than the cores, because the SLURM tests spend most of their minutes
# waiting on the cluster's status polls, which leaves a core idle beside two workers
# (CORES=all, as snakemake takes it: pytest-xdist's auto)
TEST_WORKERS ?= $(shell case '$(CORES)' in (*[!0-9]*|'') echo auto;; (*) echo $$(( $(CORES) + 1 ));; esac)

.PHONY: clean-paper reproduce published test lint dry-run clean lock

# constraints.txt pins every package of .venv to the versions the README's numbers were measured
# with; `make lock` rewrites it from the current .venv after a deliberate upgrade (`pip install -U`
# in .venv; a raised bound in pyproject.toml needs its package's pin deleted first).
$(BIN)/webssl-repro: pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; (3, 11) <= sys.version_info[:2] <= (3, 12) or sys.exit("webssl-repro needs Python 3.11 or 3.12 (snakemake 9 needs 3.11+; rapidocr-onnxruntime 1.4.4, the mini OCR filter, needs < 3.13); PYTHON=$(PYTHON) is " + sys.version.split()[0] + ": set PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

reproduce: $(BIN)/webssl-repro
	$(BIN)/snakemake --cores $(CORES) all
	$(BIN)/snakemake --cores $(CORES) all --configfile config/published.yaml

published: $(BIN)/webssl-repro
	$(BIN)/snakemake --cores $(CORES) all --configfile config/published.yaml

test: $(BIN)/webssl-repro
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -q --durations=30

lint: $(BIN)/webssl-repro
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check Snakefile rules

lock: | $(BIN)/webssl-repro
	$(BIN)/pip freeze --exclude-editable > constraints.txt.freeze
	test -s constraints.txt.freeze  # an empty freeze would unpin everything
	{ sed -n '/^#/p' constraints.txt; LC_ALL=C sort -f constraints.txt.freeze; } > constraints.txt.new
	rm constraints.txt.freeze
	mv constraints.txt.new constraints.txt
	touch $(BIN)/webssl-repro  # .venv is what the new list describes

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
