# The README's two commands:  `make demo`  (the main job)  and  `make test`  (every test).
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

PY    := $(VENV)/bin/python
STAMP := $(VENV)/.minidalle-installed

.PHONY: demo test setup clean

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
	$(PY) -m minidalle demo --preset $(PRESET)

test: setup
	$(VENV)/bin/nbstripout --verify notebooks/*.ipynb
	$(PY) -m pytest tests/ notebooks/ --nbval-lax --nbval-current-env

clean:
	rm -rf $(VENV) runs .pytest_cache
