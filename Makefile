# Two entry points for users: `make serve` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install install-dev serve test test-docker screenshots bench bench-gpu gpu-wheels gpu-measure train evaluate \
	loadtest soak

# Runtime dependencies only. The stamp makes re-runs instant until pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	-$(PY) -m model.attention.build  # compile the CPU kernel now, not on the first request (fused serves without it)
	touch $@

# Plus the test and benchmark tools (pytest, timm as the numerical oracle, hypothesis).
$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

# The service on 0.0.0.0:8000 with the shipped default model (HALO_* variables: see README).
serve: install
	$(PY) -m app

test: install-dev
	$(PY) -m pytest

# docker compose for real: the images built offline and the stack run in a private dockerd (root;
# what it checks: tests/docker/compose_e2e.py).
test-docker: install-dev
	$(PY) -m tests.docker.compose_e2e

# The demo page's screenshots in docs/images/ (the README shows them), taken by its browser test in
# headless Chromium (Debian's chromium package) against the shipped model.
screenshots: install-dev
	DEMO_SCREENSHOTS_DIR=docs/images $(PY) -m pytest -q tests/browser

bench: install-dev
	$(PY) -m benchmarks.attention
	$(PY) -m benchmarks.model

# On a machine with a CUDA GPU: the Triton kernel at real sizes, then the GPU table (JSON kept).
bench-gpu: install-dev
	$(PY) -m pytest -q tests/unit/test_triton_kernel.py
	$(PY) -m benchmarks.attention --device cuda --json bench-gpu.json
	$(PY) -m benchmarks.model --device cuda --json bench-gpu-model.json

# The service's runtime dependencies but GPU_PROVIDED (torch brings triton and the CUDA libraries), with
# what they need, as wheels for CPython GPU_PYTHON on x86_64 Linux in gpu-wheels/: for a GPU machine whose
# own python has torch but no network (gpu-measure with WHEELS=gpu-wheels installs the ones it lacks).
GPU_PYTHON ?= 3.12
GPU_PROVIDED ?= torch torchvision numpy pillow
# glibc 2.28 or later (torch's own wheels need it); pip takes each tag as it is, older ones listed too.
GPU_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
GPU_REQUIREMENTS = $(shell $(PY) -c 'import re, shlex, tomllib; skip = "$(GPU_PROVIDED)".split(); \
	deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]; \
	print(" ".join(shlex.quote(d) for d in deps if re.match(r"[\w.-]+", d)[0] not in skip))')
gpu-wheels: install
	rm -rf gpu-wheels
	$(PY) -m pip download --quiet --dest gpu-wheels --only-binary=:all: --implementation cp \
		--python-version $(GPU_PYTHON) --abi cp$(subst .,,$(GPU_PYTHON)) --abi abi3 --abi none \
		$(addprefix --platform ,$(GPU_PLATFORMS)) $(GPU_REQUIREMENTS)
	du -sh gpu-wheels

# On a GPU machine, in a few minutes: the kernel tests at real sizes, the GPU benchmarks and the service
# on the GPU against the raw model (benchmarks/gpu_session.sh), logs and JSON in GPU_OUT. GPU_PY=python3
# WHEELS=gpu-wheels for a machine's own python instead of the venv (no install then).
GPU_OUT ?= gpu-results
GPU_PY ?= $(PY)
gpu-measure: $(if $(filter $(PY),$(GPU_PY)),install-dev)
	PY=$(GPU_PY) WHEELS=$(WHEELS) bash benchmarks/gpu_session.sh $(GPU_OUT)

# The shipped default model: train it from scratch (Fashion-MNIST from the Debian package
# dataset-fashion-mnist), then check it. glibc keeps freed memory instead of returning it to the
# OS on every step (fewer page faults; same numbers).
train: install
	MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) -m model.train

evaluate: install
	$(PY) -m model.evaluate
	$(PY) -m model.evaluate --via-png

# Locust against the service (started here, or HALO_URL); report in loadtest-report/.
LOADTEST_USERS ?= 16
LOADTEST_DURATION ?= 60
loadtest: install-dev
	$(PY) -m benchmarks.loadtest --users $(LOADTEST_USERS) --duration $(LOADTEST_DURATION)

# The service under mixed traffic for SOAK_DURATION seconds, watched for leaks, errors and latency drift
# (rules: tests/reliability/soak.py); report in soak-report/, exit status 1 when a rule is broken.
SOAK_DURATION ?= 1800
soak: install-dev
	$(PY) -m tests.reliability.soak --duration $(SOAK_DURATION) --report soak-report
