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
# torch's pin, for the image too (the CPU image takes its +cpu build).
TORCH_VERSION := $(shell sed -n 's/^torch==//p' constraints.txt)

# Images are built and run by docker where a Docker engine answers, else by buildah (builds) and
# podman (runs, pushes), which need no daemon (`make container-tools` installs them). Their settings
# for this kind of machine (runc, the ulimits it grants, builds in chroot isolation) are exported to
# them; point CONTAINERS_CONF at your own file to use yours.
DOCKER_ENGINE = $(eval DOCKER_ENGINE := $$(shell docker info >/dev/null 2>&1 && echo docker))$(DOCKER_ENGINE)
RUNNER = $(or $(DOCKER_ENGINE),podman)
BUILD = $(if $(DOCKER_ENGINE),docker build,$(if $(shell command -v buildah 2>/dev/null),buildah bud,podman build))
GPU_FLAGS = $(if $(DOCKER_ENGINE),--gpus all,--device nvidia.com/gpu=all)
# Rootless podman maps this user to root inside the container: keep-id keeps --user this user there,
# so the run dir it writes under ./runs is this user's.
KEEP_ID = $(if $(DOCKER_ENGINE),,$(if $(filter 0,$(shell id -u)),,--userns=keep-id))
export CONTAINERS_CONF ?= $(CURDIR)/docker/containers.conf
export BUILDAH_ISOLATION ?= chroot
# buildah and podman builds mount build/home at /root, read-only: a pip.conf trusting this machine's
# CA bundle (HTTPS may pass through an intercepting proxy here) and, for the CPU image, torch's CPU
# wheel where it lies on disk. Nothing of it lands in the image; docker builds use the network as is.
BUILD_CA ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
# `make image-cpu`: the same Dockerfile on a Debian base made from Debian's archive and torch's CPU
# wheel, for machines that reach no container registry or CUDA wheel index. The wheel comes from
# where pip finds wheels on disk here (find-links) when the pinned one is there, else from
# PyTorch's CPU index.
CPU_BASE ?= localhost/kantai-base:bookworm
CPU_TAG ?= $(TAG)-cpu
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
# Only buildah and podman builds see it (through the build/home mount); a docker build takes the index.
TORCH_CPU_WHEEL = $(if $(DOCKER_ENGINE),,$(firstword $(wildcard $(addsuffix /torch-$(TORCH_VERSION)+cpu-*.whl,$(TORCH_WHEELS)))))
# Builds image $(1) with build args $(2) and the wheel $(3) on hand; the image the tag named before,
# now untagged, is removed.
BUILD_IMAGE = set -e; rm -rf build/home; mkdir -p build/home/.config/pip build/home/wheels; \
	$(if $(BUILD_CA),cp $(BUILD_CA) build/home/ca.crt;) \
	$(if $(3),ln -f $(3) build/home/wheels/ 2>/dev/null || cp $(3) build/home/wheels/;) \
	printf '[global]\n$(if $(BUILD_CA),cert = /root/ca.crt\n)$(if $(3),find-links = /root/wheels\n)' \
	  > build/home/.config/pip/pip.conf; \
	old=$$($(RUNNER) image inspect --format '{{.Id}}' $(1) 2>/dev/null || true); \
	$(BUILD) -f docker/Dockerfile -t $(1) $(if $(DOCKER_ENGINE),,-v $(CURDIR)/build/home:/root:ro) \
	  --build-arg KANTAI_IMAGE=$(1) --build-arg KANTAI_GIT_COMMIT=$$(git rev-parse HEAD) $(2) .; \
	[ -z "$$old" ] || [ "$$old" = "$$($(RUNNER) image inspect --format '{{.Id}}' $(1))" ] || \
	  $(RUNNER) rmi "$$old" >/dev/null 2>&1 || true

# Cluster submissions (kubectl on the manifests `kantai-batch render-k8s` renders from k8s/):
OVERLAY ?= k8s/overlays/gpu
NODES ?= 1
GPUS ?= 1
# Pods of the tokenize Indexed Job, each making one part of the tokens.
TOKENIZE_PODS ?= 1
# Whether RUN_ID was given (make schedule needs one), before the default makes it a file variable.
RUN_ID_GIVEN := $(filter command line environment,$(origin RUN_ID))
RUN_ID ?= $(shell date -u +%Y%m%d-%H%M%S)
RUN_ID := $(RUN_ID)
KUBECTL ?= $(BIN)/kubectl
# Where the Jobs run (the overlay's namespace unless NAMESPACE is given: render-k8s then puts them
# there), so where status, logs and submit-pipeline look for them.
# (NAMESPACE= given empty is the overlay's too, not an empty --namespace or kubectl -n.)
NAMESPACE_GIVEN := $(if $(NAMESPACE),$(filter command line environment,$(origin NAMESPACE)))
override NAMESPACE := $(or $(NAMESPACE),$(shell sed -n 's/^namespace: *//p' $(OVERLAY)/kustomization.yaml 2>/dev/null),default)
# Kueue's LocalQueue for the Jobs (empty: they start at once, outside any queue).
QUEUE ?=
# Only what was given to make overrides the overlay's settings (its run dir, job, image).
RENDER = $(BIN)/kantai-batch render-k8s --overlay $(OVERLAY) --run-id $(RUN_ID) --nodes $(NODES) --gpus $(GPUS) \
	--tokenize-pods $(TOKENIZE_PODS) \
	$(if $(filter command line environment,$(origin JOB)),--job $(JOB)) \
	$(if $(filter command line environment,$(origin RUN_DIR)),--run-dir $(RUN_DIR)) \
	$(if $(CORPUS),--corpus $(CORPUS)) \
	$(if $(filter command line environment,$(origin IMAGE)),--image $(IMAGE):$(TAG),$(if \
	  $(filter command line environment,$(origin TAG)),--image :$(TAG))) \
	$(if $(QUEUE),--queue $(QUEUE)) $(if $(NAMESPACE_GIVEN),--namespace $(NAMESPACE))
# Waits for one Job to finish; fails (and stops submit-pipeline) when it failed, or when the Job cannot
# be read three times running (gone, or the cluster out of reach).
WAIT_JOB = misses=0; for _ in $$(seq 1 100000); do \
	  if ! state=$$($(KUBECTL) -n $(NAMESPACE) get job $(1) -o jsonpath='{.status.conditions[?(@.status=="True")].type}'); then \
	    misses=$$((misses + 1)); [ $$misses -lt 3 ] || { echo "job $(1) cannot be read in namespace $(NAMESPACE)" >&2; exit 1; }; \
	  else misses=0; fi; \
	  case "$$state" in *Failed*) echo "job $(1) failed: make logs RUN_ID=$(RUN_ID)" >&2; exit 1;; \
	  *Complete*) echo "job $(1) complete"; break;; esac; sleep 30; done

.PHONY: help install browser container-tools demo bench test test-fast test-floors lint clean image image-cpu cpu-base push \
	local-pretrain render submit-prepare \
	submit-tokenizer submit-tokenize submit-pretrain submit-evaluate submit-register submit-pipeline schedule status logs \
	gpu-wheels gpu-check gpu-check-dry-run

help:
	@echo "make install   create $(VENV) with the package and its dependencies"
	@echo "make demo      run the KantaiBERT job on the embedded defaults [CORPUS=path-or-url]"
	@echo "make bench     the job's training throughput vs the recipe [CORPUS=... BENCH_ARGS=...]"
	@echo "make test      run the test suite (installs Chromium for the chat page test when root)"
	@echo "make test-fast the tests not marked slow: no training, torchrun, images, S3/MLflow servers or browser"
	@echo "make test-floors the tests marked floors, in $(FLOORS_VENV) with every dependency at pyproject.toml's lower bound"
	@echo "make gpu-wheels  the wheels a bare GPU machine lacks, for CPython 3.12 manylinux x86_64, in .whl/"
	@echo "make gpu-check   on a GPU machine: gpu tests, bf16 throughput and MFU (block 128/512, compile, ZeRO-2) and a profile of the compiled step"
	@echo "make lint      ruff check and format check"
	@echo "make image     build the CUDA image $(IMAGE):$(TAG) (docker, else buildah/podman); make push pushes it"
	@echo "make image-cpu build the same Dockerfile as a CPU image $(IMAGE):$(CPU_TAG) on a Debian base made here"
	@echo "make local-pretrain  run the job in the image on all GPUs with ./runs mounted [JOB CORPUS RUN_DIR]"
	@echo "make submit-prepare | submit-tokenizer | submit-tokenize | submit-pretrain | submit-evaluate | submit-register"
	@echo "               one phase as a Kubernetes Job [OVERLAY NAMESPACE RUN_ID JOB RUN_DIR CORPUS IMAGE TAG QUEUE; NODES GPUS; TOKENIZE_PODS]"
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

# The image tests build and run the image with buildah, podman and runc, on a Debian base made by
# mmdebstrap; installed like Chromium, and skipped where they are missing.
container-tools:
	@{ command -v buildah && command -v podman && command -v runc && command -v mmdebstrap; } >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y --no-install-recommends $(CONTAINER_TOOLS) >/dev/null 2>&1 || \
		  { apt-get update >/dev/null 2>&1 && apt-get install -y --no-install-recommends $(CONTAINER_TOOLS) >/dev/null 2>&1; }; }; } || \
		echo "make: buildah, podman, runc and mmdebstrap could not be installed; the image tests will be skipped"

CONTAINER_TOOLS := buildah podman runc mmdebstrap

bench: install
	$(BIN)/kantai-batch bench --job $(JOB) --run-dir runs/bench $(if $(CORPUS),--corpus $(CORPUS)) $(BENCH_ARGS)

# The slowest tests are listed at the end: the suite must stay well under 30 minutes on 2 cores (about
# 26 there on 2026-12-08, most of it in some 20 end-to-end tests: the image build alone takes 4).
test: install browser container-tools
	$(BIN)/python -m pytest --durations=20 $(PYTEST_ARGS)

# The edit-and-check loop: leaves out the end-to-end tests (pytest's `slow` marker), so it needs
# neither Chromium nor the container tools.
test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The lower bounds pyproject.toml declares, tested (CI's `make test` takes the newest releases):
# tools/floors.py pins every dependency (and the deepspeed extra's) to its floor, torch to constraints.txt's
# CPU wheel, installs the project into $(FLOORS_VENV) with them (again only when pyproject.toml changed)
# and runs the tests marked `floors` there; it fails on a floor pip cannot install beside the others.
FLOORS_VENV ?= .venv-floors
test-floors: install
	$(BIN)/python tools/floors.py --python $(PYTHON) --venv $(FLOORS_VENV) $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

lint: install
	$(BIN)/ruff check kantai_batch tests tools
	$(BIN)/ruff format --check kantai_batch tests tools

clean:
	rm -rf runs build .pytest_cache

# The GPU figures. On this machine: make gpu-wheels (and make gpu-check-dry-run to check the script).
# On a bare GPU machine whose image has torch, transformers, accelerate and tokenizers, with .whl/
# carried over: pip install --no-index --no-deps --target /tmp/site .whl/*.whl (one part per call when
# gpu-wheels split the set), then make gpu-check PYTHONPATH=/tmp/site:$$PWD. No virtualenv there.
GPU_PYTHON ?= python3
gpu-wheels: install
	$(BIN)/python bench/gpu_wheels.py --out .whl

gpu-check:
	PYTHONPATH="$(PYTHONPATH)" $(GPU_PYTHON) bench/gpu_check.py --out bench/results $(GPU_CHECK_ARGS)

gpu-check-dry-run: install
	$(BIN)/python bench/gpu_check.py --dry-run --out $${TMPDIR:-/tmp}/kantai-gpu-check-results

image:
	@$(call BUILD_IMAGE,$(IMAGE):$(TAG),--build-arg TORCH_VERSION=$(TORCH_VERSION))

image-cpu: cpu-base
	@$(call BUILD_IMAGE,$(IMAGE):$(CPU_TAG),--build-arg CUDA_IMAGE=$(CPU_BASE) \
	  --build-arg TORCH_VERSION=$(TORCH_VERSION)+cpu \
	  --build-arg TORCH_INDEX=$(if $(TORCH_CPU_WHEEL),https://pypi.org/simple,$(TORCH_CPU_INDEX)),$(TORCH_CPU_WHEEL))

# Debian bookworm with Python 3.11, from Debian's archive, as a local image (made once).
cpu-base:
	@$(RUNNER) image inspect $(CPU_BASE) >/dev/null 2>&1 || { set -e; mkdir -p build; \
	  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm build/rootfs.tar; \
	  $(RUNNER) import build/rootfs.tar $(CPU_BASE) >/dev/null; rm build/rootfs.tar; echo "made $(CPU_BASE)"; }

push: image
	$(RUNNER) push $(IMAGE):$(TAG)

# ./runs is mounted at /home/kantai/runs: RUN_DIR and a local CORPUS must lie below ./runs
# (or be s3:// and http(s) URIs, with AWS_* and MLFLOW_* passed through from this shell). Tracked
# only to the MLFLOW_TRACKING_URI of this shell (a server): MLflow's local default lies in the
# working directory, the image's home, which --user cannot write and --rm throws away. Without it
# the run dir still holds the summary and the metrics.
# One process per GPU under launch (DDP: one `run` process would drive them all through the Trainer's
# DataParallel), and NCCL's shared memory the size the pods get (a container's default is 64 MB).
local-pretrain:
	$(RUNNER) run --rm $(GPU_FLAGS) --shm-size 16g $(KEEP_ID) --user $$(id -u):$$(id -g) \
		-v "$(abspath runs)":/home/kantai/runs \
		-e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY -e AWS_SESSION_TOKEN -e AWS_ENDPOINT_URL_S3 \
		-e MLFLOW_TRACKING_URI -e MLFLOW_TRACKING_TOKEN $(IMAGE):$(TAG) launch --nproc-per-node gpu \
		run --job $(JOB) --run-dir $(RUN_DIR) $(if $(CORPUS),--corpus $(CORPUS)) $(if $(MLFLOW_TRACKING_URI),,--no-tracking)

render: install
	@$(RENDER)

submit-prepare submit-tokenizer submit-tokenize submit-pretrain submit-evaluate submit-register: install
	$(RENDER) --phase $(patsubst tokenizer,train-tokenizer,$(@:submit-%=%)) | $(KUBECTL) apply -f -
	@echo "submitted run $(RUN_ID): make status logs RUN_ID=$(RUN_ID)"

submit-pipeline: install
	@for phase in prepare train-tokenizer tokenize pretrain evaluate register; do \
	  $(RENDER) --phase $$phase | $(KUBECTL) apply -f - || exit 1; \
	  $(call WAIT_JOB,kantai-$$phase-$(RUN_ID)) || exit 1; \
	done

# RUN_ID names the CronJob: without a fixed one, every `make schedule` would add another schedule
# writing to the same run dir and registered model.
schedule: install
	$(if $(RUN_ID_GIVEN),,$(error make schedule needs RUN_ID=NAME, \
	  the schedule's own name (e.g. weekly); the same name updates that schedule))
	$(RENDER) --phase retrain | $(KUBECTL) apply -f -

status: install
	$(KUBECTL) -n $(NAMESPACE) get jobs,cronjobs,pods -l kantai.io/run=$(RUN_ID) -o wide

logs: install
	$(KUBECTL) -n $(NAMESPACE) logs -l kantai.io/run=$(RUN_ID) --all-containers --prefix --tail=200
