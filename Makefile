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

# Cluster submissions (kubectl on the manifests `kantai-batch render-k8s` renders from k8s/):
OVERLAY ?= k8s/overlays/gpu
NODES ?= 1
GPUS ?= 1
RUN_ID ?= $(shell date -u +%Y%m%d-%H%M%S)
RUN_ID := $(RUN_ID)
KUBECTL ?= $(BIN)/kubectl
# Only what was given to make overrides the overlay's settings (its run dir, job, image).
RENDER = $(BIN)/kantai-batch render-k8s --overlay $(OVERLAY) --run-id $(RUN_ID) --nodes $(NODES) --gpus $(GPUS) \
	$(if $(filter command line environment,$(origin JOB)),--job $(JOB)) \
	$(if $(filter command line environment,$(origin RUN_DIR)),--run-dir $(RUN_DIR)) \
	$(if $(CORPUS),--corpus $(CORPUS)) \
	$(if $(filter command line environment,$(origin IMAGE)),--image $(IMAGE):$(TAG))
# Waits for one Job to finish; fails (and stops submit-pipeline) when it failed.
WAIT_JOB = for _ in $$(seq 1 100000); do \
	  state=$$($(KUBECTL) get job $(1) -o jsonpath='{.status.conditions[?(@.status=="True")].type}'); \
	  case "$$state" in *Failed*) echo "job $(1) failed: make logs RUN_ID=$(RUN_ID)" >&2; exit 1;; \
	  *Complete*) echo "job $(1) complete"; break;; esac; sleep 30; done

.PHONY: help install browser demo bench test lint clean image push local-pretrain render submit-prepare \
	submit-tokenizer submit-pretrain submit-evaluate submit-register submit-pipeline schedule status logs \
	gpu-wheels gpu-check gpu-check-dry-run

help:
	@echo "make install   create $(VENV) with the package and its dependencies"
	@echo "make demo      run the KantaiBERT job on the embedded defaults [CORPUS=path-or-url]"
	@echo "make bench     the job's training throughput vs the recipe [CORPUS=... BENCH_ARGS=...]"
	@echo "make test      run the test suite (installs Chromium for the chat page test when root)"
	@echo "make gpu-wheels  the wheels a bare GPU machine lacks, for CPython 3.12 manylinux x86_64, in .whl/"
	@echo "make gpu-check   on a GPU machine: gpu tests, bf16 throughput and MFU (block 128/512, compile, ZeRO-2)"
	@echo "make lint      ruff check and format check"
	@echo "make image     build the CUDA image $(IMAGE):$(TAG); make push pushes it"
	@echo "make local-pretrain  docker run --gpus all the job with ./runs mounted [JOB CORPUS RUN_DIR]"
	@echo "make submit-prepare | submit-tokenizer | submit-pretrain | submit-evaluate | submit-register"
	@echo "               one phase as a Kubernetes Job [OVERLAY RUN_ID JOB RUN_DIR CORPUS IMAGE TAG; NODES GPUS]"
	@echo "make submit-pipeline  every phase in turn, each after the one before completed"
	@echo "make schedule  the retraining CronJob [RUN_ID=weekly ...]; make status / logs [RUN_ID]"

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
		--set train.logging_steps=5 --set eval.probes=jobs/probes/kant.txt

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

# The GPU figures. On this machine: make gpu-wheels (and make gpu-check-dry-run to check the script).
# On a bare GPU machine whose image has torch, transformers, accelerate and tokenizers, with .whl/
# carried over: pip install --no-index --no-deps --target /tmp/site .whl/*.whl (one part per call when
# gpu-wheels split the set), then make gpu-check PYTHONPATH=/tmp/site:$$PWD. No virtualenv there.
GPU_PYTHON ?= python3
gpu-wheels: install
	$(BIN)/python bench/gpu_wheels.py --out .whl

gpu-check:
	PYTHONPATH="$(PYTHONPATH)" $(GPU_PYTHON) bench/gpu_check.py --out bench/results

gpu-check-dry-run: install
	$(BIN)/python bench/gpu_check.py --dry-run --out $${TMPDIR:-/tmp}/kantai-gpu-check-results

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

render: install
	@$(RENDER)

submit-prepare submit-tokenizer submit-pretrain submit-evaluate submit-register: install
	$(RENDER) --phase $(patsubst tokenizer,train-tokenizer,$(@:submit-%=%)) | $(KUBECTL) apply -f -
	@echo "submitted run $(RUN_ID): make status logs RUN_ID=$(RUN_ID)"

submit-pipeline: install
	@for phase in prepare train-tokenizer pretrain evaluate register; do \
	  $(RENDER) --phase $$phase | $(KUBECTL) apply -f - || exit 1; \
	  $(call WAIT_JOB,kantai-$$phase-$(RUN_ID)) || exit 1; \
	done

schedule: install
	$(RENDER) --phase retrain | $(KUBECTL) apply -f -

status: install
	$(KUBECTL) get jobs,cronjobs,pods -l kantai.io/run=$(RUN_ID) -o wide

logs: install
	$(KUBECTL) logs -l kantai.io/run=$(RUN_ID) --all-containers --prefix --tail=200
