# make repro : set up (once) and run the whole pipeline: dvc repro (embedded profile, ~21 min on 2 cores)
# make repro PROFILE=smoke : the same pipeline on another profile, as a DVC experiment in a temporary copy
#              (dvc exp run --temp with profiles/<name>.yaml as -S overrides; the workspace's results stay as
#              they are; see dvc exp show)
# make test  : set up (once) and run the unit tests and the stored notebooks (nbval)
# Every target runs with .venv/bin first on PATH, so DVC's stage commands (`python -m spotlib.paper.pipeline ...`)
# use the project's environment without activating it.
VENV := .venv
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
PROFILE ?=

.PHONY: setup repro test check bench bench-gpu lab constraints
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh

repro: setup
ifeq ($(PROFILE),)
	dvc repro
else
	python -m spotlib.paper.pipeline exp --profile $(PROFILE)
endif

test: setup
	pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

check: setup  # validate params.yaml (every profile) without running anything
	python -m spotlib.paper.pipeline check

bench: setup
	python benchmarks/tokenizer.py

bench-gpu: setup  # evaluation and SPoT-ON images/s per budget (ViT-B/16, 224 px); CPU sizes without a GPU
	python benchmarks/throughput.py

lab: setup
	jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root,)

constraints: setup  # pin the environment's current versions (after an upgrade; then rerun the pipeline)
	{ sed -n '1,3p' constraints.txt; echo "pip==$$(pip --version | cut -d' ' -f2)"; \
	  pip freeze --exclude-editable | grep -v '^spotlib'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
