# The README's two commands:  `make demo`  (the main job)  and  `make test`  (every test).
# `make demo` trains the toy pipeline into runs/demo-toy/ and writes samples.png and report.md there;
# `make demo PRESET=smoke` is a seconds-long check; `make demo DEMO_ARGS="--device cuda"` trains on a GPU.
# Each one creates or refreshes a local virtual environment in .venv first.
#
# TORCH picks the PyTorch build. The default pins the release whose CPU wheel this project's CI
# machines carry; on a GPU machine ask pip for the build you want, e.g.
#   make demo TORCH=torch                      # PyPI's default build (CUDA on Linux x86_64)
#   make demo TORCH="torch --index-url <your PyTorch wheel index for CUDA 12.x>"
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
EXTRAS ?= dev,emoji
PRESET ?= toy
DEMO_ARGS ?=

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.minidalle-installed

# The notebooks that take under about a minute in their default (toy) preset: `make test` runs them
# that way too, beside the smoke run of every notebook. 03 trains two tokenizers (~5 minutes) and 06 the
# transformer (~15 minutes), 08 the reranker and 09 the whole pipeline (unless `make demo` ran): smoke only.
# 07 samples from the trained toy run when there is one, else an untrained model.
TOY_NOTEBOOKS := notebooks/00_setup_check.ipynb notebooks/01_toy_dataset.ipynb notebooks/02_vq_tokenizer.ipynb \
                 notebooks/04_bpe_text_tokenizer.ipynb notebooks/05_sparse_attention.ipynb notebooks/07_gpu_sampling.ipynb \
                 notebooks/10_scaling_to_full_configs.ipynb
NBVAL := --nbval-lax --nbval-current-env

.PHONY: demo test test-browser setup clean

# Reinstall when pyproject.toml changes; start from an empty .venv when TORCH or EXTRAS differ from
# what it was built with (pip would otherwise keep the torch it has, since any build satisfies "torch").
setup:
	@want="$(TORCH) | $(EXTRAS)"; have="$$(cat $(STAMP) 2>/dev/null)"; \
	if [ -x "$(PY)" ] && [ "$$have" = "$$want" ] && [ "$(STAMP)" -nt pyproject.toml ]; then \
		echo "[setup] $(VENV) is up to date ($$want)"; \
	else \
		clear=""; [ -n "$$have" ] && [ "$$have" != "$$want" ] && clear="--clear"; \
		echo "[setup] building $(VENV) with $$want $$clear"; \
		$(PYTHON) -m venv $$clear $(VENV) && \
		$(PY) -m pip install --quiet --upgrade pip && \
		$(PY) -m pip install --quiet $(TORCH) && \
		$(PY) -m pip install --quiet -e ".[$(EXTRAS)]" && \
		echo "$$want" > $(STAMP); \
	fi

demo: setup
	$(PY) -m minidalle demo --preset $(PRESET) $(DEMO_ARGS)

# Two pytest runs: (1) the unit tests, the notebook lint, and every notebook once under the smoke
# switch with each exercise tried unanswered, with a wrong answer and with its solution: in JupyterLab
# by the browser test where chromium is installed, else headless (tests/test_notebook_exercises.py);
# (2) the quick notebooks in their default preset, as a student first runs them.
test: setup
	$(VENV)/bin/nbstripout --verify notebooks/*.ipynb
	$(PY) -m pytest tests/
	@echo "[test] the notebooks in their default preset (MINIDALLE_SMOKE=0): $(notdir $(TOY_NOTEBOOKS))"
	MINIDALLE_SMOKE=0 $(PY) -m pytest $(TOY_NOTEBOOKS) $(NBVAL)

# Every notebook run through JupyterLab's Run menu in Debian's chromium (apt-get install chromium).
test-browser: setup
	$(PY) -m pytest tests/browser -v

clean:
	rm -rf $(VENV) runs .pytest_cache
