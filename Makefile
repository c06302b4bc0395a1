# Every target builds what it needs: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo figures test summary bench clean

venv: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

# The demo run's curves and Grad-CAM maps (one validation image per class), next to its checkpoints.
DEMO_RUN := runs/demo/imagenet-resnet18-simam-param0.1-93f6aa21-seed0  # scripts/demo.py:demo_run_dir() (a test checks)
figures: $(STAMP)
	test -f $(DEMO_RUN)/model_best.pth.tar || $(PY) scripts/demo.py
	$(PY) scripts/plot_curves.py $(DEMO_RUN) -o runs/demo/curves.png
	OMP_NUM_THREADS=1 $(PY) scripts/gradcam.py $(DEMO_RUN) --images data/demo/val -n 10 -o runs/demo/gradcam.png

# One process per core (pytest-xdist), a test file per process so module fixtures are built once;
# one intra-op thread each, or the processes fight over the cores.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -n auto --dist loadfile tests

summary: $(STAMP)
	$(PY) scripts/model_summary.py

bench: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf runs data/demo .pytest_cache
