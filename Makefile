# The few verbs people type. Every target creates the virtual environment it needs first.
#   make demo   set up and run the main job
#   make test   set up and run the test suite (what CI runs)
#   make bench  set up and run the CPU benchmarks (writes benchmarks/results/)
#   make lint   ruff
#   make gpu-wheels  wheels a bare GPU image may lack (see benchmarks/gpu_session.sh)

VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-cpu test-interpret test-no-vectors bench lint clean gpu-wheels

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	@# torch first: on a machine without an NVIDIA GPU take the CPU build (2.13.0 lies on this
	@# machine's disk); an unpinned torch would pull a multi-GB CUDA build.
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing torch with CUDA"; $(PIP) install "torch>=2.4"; \
	else \
		echo "no NVIDIA GPU: installing the CPU build of torch"; $(PIP) install torch==2.13.0; \
	fi
	$(PIP) install -e ".[dev,train,plot]"
	touch $@

setup: $(VENV)/.installed

# The nuisance-teacher experiment on scikit-learn's digits: 6 methods × 3 teachers × 5 seeds,
# 15–18 minutes on 2 CPU cores with the set-up (README); report, summary.csv and plots in
# runs/digits_nuisance/.
demo: setup
	$(VENV)/bin/rid-fast env
	$(VENV)/bin/rid-fast compare --config configs/digits_nuisance.yaml --out runs/digits_nuisance

# The Triton-interpreter tier is its own invocation: TRITON_INTERPRET must be set before Python
# starts (it is read when kernels are decorated). A tier that collects nothing (pytest's exit code
# 5, e.g. a mistyped marker) fails like any other.
#
# Each tier runs in pytest-xdist workers, one per core (at most 4: each holds torch and triton in
# memory); tests/conftest.py gives each worker its share of the cores for torch's threads.
# TEST_WORKERS=0 runs the tests in the pytest process itself.
TEST_WORKERS ?= $(shell n=$$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))
PYTEST := $(PY) -m pytest -n $(TEST_WORKERS)

test: setup test-cpu test-interpret test-no-vectors

test-cpu: setup
	$(PYTEST) -m "not interpret and not gpu"

test-interpret: setup
	TRITON_INTERPRET=1 $(PYTEST) -m interpret

# The accuracy tests again with every vector path turned off: the width of a CPU's vectors changes
# the order in which torch (ATEN_CPU_CAPABILITY), MKL (MKL_ENABLE_INSTRUCTIONS) and numpy, which
# the Triton interpreter computes with (NPY_DISABLE_CPU_FEATURES), add up sums, so the tolerances
# must hold for every order, not only for the one this machine's vectors give. Under the
# interpreter: InfoNCE's cases (τ = 0.1, the largest scores: the tightest bounds) and the
# far-below-zero ones. AVX-512 cannot be forced on a machine without it.
NO_VECTORS := ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
	NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"
ACCURACY_TESTS := tests/test_infonce.py tests/test_nwj.py tests/test_dv.py tests/test_smile.py tests/test_js.py

test-no-vectors: setup
	$(NO_VECTORS) $(PYTEST) -q -m "not interpret and not gpu" -k fp32 $(ACCURACY_TESTS)
	$(NO_VECTORS) TRITON_INTERPRET=1 $(PYTEST) -q -m interpret tests/test_kernels_interpret.py \
		-k "fp32 and ((test_matches_reference and infonce) or far_below_zero)"

bench: setup
	$(PY) benchmarks/run_cpu.py

# The GPU image (Python 3.12, torch, triton; no network) may lack the test runner, and has no
# Inf-CL (the benchmark's baseline): their wheels travel with the device call (carry .gpu_wheels).
gpu-wheels: setup
	$(PIP) download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
		--implementation cp -d .gpu_wheels pytest numpy "setuptools>=64"
	$(PIP) download --no-deps -d .gpu_wheels inf-cl

lint: setup
	$(VENV)/bin/ruff check rid_fast kernels tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks
