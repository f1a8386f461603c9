# kantai-batch developer and user entry points. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
JOB ?= jobs/kantaibert.yaml
RUN_DIR ?= runs/demo
# Empty: the job's corpus.source (the public URL of kant.txt). Offline: CORPUS=path/to/kant.txt
CORPUS ?=
# The demo trains a bounded number of steps so it finishes in minutes on a laptop CPU.
DEMO_STEPS ?= 20
DEMO_BATCH ?= 16
PYTEST_ARGS ?=
BENCH_ARGS ?= --steps 10 --baseline recipe
IMAGE ?= kantai-batch
TAG ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo dev)

.PHONY: help install browser demo bench test lint clean image push local-pretrain

help:
	@echo "make install   create $(VENV) with the package and its dependencies"
	@echo "make demo      run the KantaiBERT job on the embedded defaults [CORPUS=path-or-url]"
	@echo "make bench     the job's training throughput vs the recipe [CORPUS=... BENCH_ARGS=...]"
	@echo "make test      run the test suite (installs Chromium for the chat page test when root)"
	@echo "make lint      ruff check and format check"
	@echo "make image     build the CUDA image $(IMAGE):$(TAG); make push pushes it"
	@echo "make local-pretrain  docker run --gpus all the job with ./runs mounted [JOB CORPUS RUN_DIR]"

install: $(VENV)/.installed

# Re-runs only when the dependency declarations change. torch is installed first, pinned by
# constraints.txt, so no dependency can pull a newer (CUDA) build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(BIN)/kantai-batch run --job $(JOB) --run-dir $(RUN_DIR) $(if $(CORPUS),--corpus $(CORPUS)) \
		--set train.max_steps=$(DEMO_STEPS) --set train.per_device_batch_size=$(DEMO_BATCH) \
		--set train.logging_steps=5

# The chat page test drives Debian's Chromium. Installed here when we are root with apt (CI, a
# fresh container); anywhere else the test skips when no browser is found.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
		echo "make: no Chromium could be installed; the chat page test will be skipped"

bench: install
	$(BIN)/kantai-batch bench --job $(JOB) --run-dir runs/bench $(if $(CORPUS),--corpus $(CORPUS)) $(BENCH_ARGS)

test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check kantai_batch tests
	$(BIN)/ruff format --check kantai_batch tests

clean:
	rm -rf runs .pytest_cache

image:
	docker build -f docker/Dockerfile -t $(IMAGE):$(TAG) \
		--build-arg KANTAI_IMAGE=$(IMAGE):$(TAG) --build-arg KANTAI_GIT_COMMIT=$$(git rev-parse HEAD) .

push: image
	docker push $(IMAGE):$(TAG)

# ./runs is mounted at /home/kantai/runs: RUN_DIR and a local CORPUS must lie below ./runs
# (or be s3:// and http(s) URIs, with AWS_* and MLFLOW_* passed through from this shell).
local-pretrain:
	docker run --rm --gpus all --user $$(id -u):$$(id -g) -v "$(abspath runs)":/home/kantai/runs \
		-e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_SESSION_TOKEN -e AWS_ENDPOINT_URL_S3 \
		-e MLFLOW_TRACKING_URI $(IMAGE):$(TAG) \
		run --job $(JOB) --run-dir $(RUN_DIR) $(if $(CORPUS),--corpus $(CORPUS))
