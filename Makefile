# Two commands do all set-up on a fresh machine (README.md):
#   make demo   install, then run the four stages on the embedded corpus
#   make test   install, then run the test suite against the installed package
#
# CPU machines get the CPU build of torch (installed before deepspeed, which would otherwise pull
# a CUDA build of several GB). On a GPU machine keep your CUDA torch: `make install TORCH=`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
DEEPSPEED ?= deepspeed==0.19.8
SHARED ?= ../shared

# tiktoken caches its GPT-2 files here; offline, they are seeded from $(SHARED) when it exists.
export TIKTOKEN_CACHE_DIR ?= $(CURDIR)/.cache/tiktoken
# DeepSpeed compiles a small communication op at its first start; a fixed folder reuses it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test lint tokenizer-cache clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Dependencies once; the package itself on every call, so tests see the current tree as installed.
# The `ray` and `plot` extras let the suite test `lmpipe dedup --engine ray` and its clusters.png,
# the `parquet` extra reading .parquet input, the `hf` extra the Hugging Face export and import,
# the `tensorboard` extra the event files `lmpipe train` writes, the `lmeval` extra the check that
# lm-evaluation-harness scores an exported folder as `lmpipe eval` does.
$(VENV)/.deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH) $(DEEPSPEED)
	$(BIN)/pip install -q ".[test,ray,plot,parquet,hf,tensorboard,lmeval]"
	touch $@

install: $(VENV)/.deps tokenizer-cache
	$(BIN)/pip install -q --no-deps --force-reinstall .

tokenizer-cache:
	@if [ -x $(SHARED)/tools/tiktoken-cache ] && [ ! -s $(TIKTOKEN_CACHE_DIR)/6d1cbeee0f20b3d9449abfede4726ed8212e3aee ]; then \
		$(SHARED)/tools/tiktoken-cache $(TIKTOKEN_CACHE_DIR) >/dev/null && echo "seeded tiktoken cache from $(SHARED)"; \
	fi

demo: install
	$(BIN)/lmpipe demo --workdir demo --overwrite

test: install
	$(BIN)/python -m pytest

# Lint reads the tree, so it needs the tools but not the package (nor reinstalls over an
# editable install a developer made). mypy reads the tree through links named as the package
# installs it (pyproject.toml's [tool.mypy]).
lint: $(VENV)/.deps
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	mkdir -p .cache/mypy-src/lmpipe
	for p in cli dataprep train evals recipes; do ln -sfn $(CURDIR)/$$p .cache/mypy-src/lmpipe/$$p; done
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build demo .cache *.egg-info
