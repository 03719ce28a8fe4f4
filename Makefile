# make repro : set up (once) and run the whole pipeline (dvc repro, embedded profile)
# make test  : set up (once) and run the unit tests and the stored notebooks (nbval)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup repro test bench bench-gpu lab
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/pytest --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg

bench: setup
	$(BIN)/python benchmarks/tokenizer.py

bench-gpu: setup  # evaluation and SPoT-ON images/s per budget (ViT-B/16, 224 px); CPU sizes without a GPU
	$(BIN)/python benchmarks/throughput.py

lab: setup
	$(BIN)/jupyter lab
