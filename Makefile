# Everything runs from a local virtualenv that `make install` builds from scratch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench clean browser

install: $(STAMP)

$(STAMP): setup.py requirements-prepare.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The suite on every core: modules are spread over the workers (--dist loadscope), each module's
# tests stay in one worker so its shared fixtures are built once; modules start in the order of
# tests/conftest.py (the longest first), not by their number of tests.
# One file: $(PY) -m pytest tests/test_x.py
test: install browser
	$(PY) -m pytest -q -n auto --dist loadscope --no-loadscope-reorder --durations=25 tests

# A headless browser for the test that renders the evaluation's report.html (Debian's chromium).
browser:
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; }; }

lint: install
	$(VENV)/bin/ruff check trainer tests demo bench k8s
	$(VENV)/bin/zizmor --offline --min-severity=low .github/workflows

clean:
	rm -rf $(VENV) *.egg-info demo_output bench_output

# The whole job offline on an embedded dataset, with a GCS server on loopback (demo/run_demo.py).
demo: install
	$(PY) demo/run_demo.py --output=demo_output

# ---- Cluster: image, manifests, submission (docs/cluster.md) ---------------------------------
# Nothing below needs a cluster until `kubectl apply`: `make render` and DRY_RUN=1 only print.
#   make image push IMAGE=us-docker.pkg.dev/my-project/trainer/image-transfer-trainer:v1
#   make submit-train IMAGE=... DATA=gs://b/datasets/cats-dogs/dataset.json JOB_DIR=gs://b/runs/r1 GPUS=4
#   make submit-train ... WORKERS=2 [MULTI=indexed]   (multi-node: a JobSet, or an Indexed Job)
#   make status [RUN=name]; make logs RUN=name [FOLLOW=1]; make wait RUN=name [TIMEOUT=6h]
#   make submit-eval IMAGE=... DATA=... JOB_DIR=gs://b/runs/r1   (-> JOB_DIR/eval/metrics.json)
#   make submit-* ... QUEUE=team-a          (Kueue: the LocalQueue that admits the run)
#   make submit-vertex IMAGE=... DATA=... JOB_DIR=gs://b/runs/r1 REGION=us-central1 [WORKERS=2] [SPOT=1]
.PHONY: image push image-dataflow push-dataflow render submit-train submit-eval submit-vertex submit-tune submit-vertex-tune submit-bench bench-gpu status logs wait

BUILDER ?= docker
IMAGE ?= us-docker.pkg.dev/YOUR_PROJECT/trainer/image-transfer-trainer:$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
DATAFLOW_IMAGE ?= us-docker.pkg.dev/YOUR_PROJECT/trainer/image-transfer-prepare:$(shell git rev-parse --short HEAD 2>/dev/null || echo dev)
KUBECTL ?= kubectl
# render.py needs PyYAML: the project's venv when there is one, else any python3 with PyYAML.
RENDER_PY ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPUS ?= 1
WORKERS ?= 1
MULTI ?= jobset
ACCELERATOR ?= nvidia-l4
SPLIT ?= test
TAIL ?= 200
TIMEOUT ?= 6h
# Optional: RUN (the run's name), OVERLAY, ARGS (more trainer flags), GSA (also apply the
# ServiceAccount bound to this Google service account), QUEUE (Kueue LocalQueue), MODEL/OUTPUT
# (eval), DRY_RUN=1, FOLLOW=1. ACCELERATOR and GPUS pick a row of k8s/shapes.yaml.
REGION ?= us-central1
GCLOUD ?= gcloud
RUN_STAMP := $(shell date -u +%Y%m%d-%H%M%S)
# The values a user gives (DATA=..., ARGS=...) reach the shell only as environment variables, and
# are only ever expanded inside double quotes ("$$DATA"): never pasted into the command text, so
# `DATA='x; cmd'` is a (bad) location, not a command.
# Make itself would expand `$(...)` in them (DATA='$(shell cmd)'): they are taken as literal text.
USER_VARIABLES := IMAGE DATAFLOW_IMAGE GPUS WORKERS MULTI ACCELERATOR SPLIT TAIL TIMEOUT REGION DATA JOB_DIR MODEL OUTPUT RUN \
	OVERLAY ARGS GSA QUEUE DRY_RUN FOLLOW SPOT TENSORBOARD EXPERIMENT
$(foreach v,$(USER_VARIABLES),$(if $(filter command line environment,$(origin $(v))),\
	$(eval override $(v) := $$(value $(v)))))
export $(USER_VARIABLES)
# Shell: the render arguments every submission shares, as "$$@". ARGS splits at blanks, unglobbed.
RENDER_COMMON = set -f; set -- --image="$$IMAGE" --gpus="$$GPUS" --accelerator="$$ACCELERATOR"; \
	if [ -n "$$QUEUE" ]; then set -- "$$@" --queue="$$QUEUE"; fi; \
	if [ -n "$$GSA" ]; then set -- "$$@" --service-account-email="$$GSA"; fi; \
	for arg in $$ARGS; do set -- "$$@" "--set=$${arg\#--}"; done
SELECTOR = "app.kubernetes.io/name=image-trainer$${RUN:+,app.kubernetes.io/instance=$$RUN}"
# A submission with the placeholder image could only fail on the cluster (DRY_RUN=1 may print it).
CHECK_IMAGE = if [ -z "$$DRY_RUN" ]; then case "$$IMAGE" in *YOUR_PROJECT*) echo "make: IMAGE is the \
	placeholder $$IMAGE: pass IMAGE=REGISTRY/REPO/NAME:TAG (the image make push pushed), or DRY_RUN=1 to print \
	only" >&2; exit 2;; esac; fi
# Prints the manifests (DRY_RUN=1) or applies them; a failed render applies nothing.
APPLY = if [ -n "$$DRY_RUN" ]; then printf '%s\n' "$$manifest"; \
	else printf '%s\n' "$$manifest" | $(KUBECTL) apply -f - && \
	echo "submitted $$run: make status RUN=$$run; make logs RUN=$$run FOLLOW=1; make wait RUN=$$run"; fi

image:
	$(BUILDER) build --tag "$$IMAGE" .

# The Dataflow worker image of `trainer prepare --runner=DataflowRunner` (README: Prepare at scale);
# DATAFLOW_WORKLOAD=predict: the one of `trainer predict`, with TensorFlow (README: Predict at scale).
DATAFLOW_WORKLOAD ?= prepare
image-dataflow:
	$(BUILDER) build --file Dockerfile.dataflow --build-arg WORKLOAD=$(DATAFLOW_WORKLOAD) --tag "$$DATAFLOW_IMAGE" .

push-dataflow:
	@case "$$DATAFLOW_IMAGE" in *YOUR_PROJECT*) echo "usage: make push-dataflow DATAFLOW_IMAGE=REGISTRY/REPO/NAME:TAG" >&2; exit 2;; esac
	$(BUILDER) push "$$DATAFLOW_IMAGE"

push:
	@case "$$IMAGE" in *YOUR_PROJECT*) echo "usage: make push IMAGE=REGISTRY/REPO/NAME:TAG" >&2; exit 2;; esac
	$(BUILDER) push "$$IMAGE"

render:
	@for overlay in k8s/base k8s/overlays/*/; do \
		printf -- '---\n# %s\n' "$${overlay%/}"; kubectl kustomize "$$overlay" || exit 1; done

submit-train:
	@if [ -z "$$DATA" ] || [ -z "$$JOB_DIR" ]; then echo "usage: make submit-train DATA=gs://.../dataset.json JOB_DIR=gs://.../runs/NAME [GPUS=1] [WORKERS=1 [MULTI=jobset|indexed]] [ARGS='--epochs=2'] [RUN=name] [DRY_RUN=1]" >&2; exit 2; fi
	@$(CHECK_IMAGE); run="$${RUN:-train-$(RUN_STAMP)}"; $(RENDER_COMMON); \
	if [ "$$WORKERS" = 1 ]; then overlay=k8s/overlays/gpu-spot; \
	else overlay="k8s/overlays/multiworker-$$MULTI"; set -- "$$@" --workers="$$WORKERS"; fi; \
	manifest="$$($(RENDER_PY) k8s/render.py "$${OVERLAY:-$$overlay}" --command=train --name="$$run" "$$@" \
		--set=data="$$DATA" --set=job_dir="$$JOB_DIR")" && $(APPLY)

submit-eval:
	@if [ -z "$$DATA" ] || [ -z "$$JOB_DIR$$MODEL" ]; then echo "usage: make submit-eval DATA=gs://.../dataset.json JOB_DIR=gs://.../runs/NAME [MODEL=JOB_DIR/model] [OUTPUT=JOB_DIR/eval] [SPLIT=test] [RUN=name] [DRY_RUN=1]" >&2; exit 2; fi
	@$(CHECK_IMAGE); run="$${RUN:-eval-$(RUN_STAMP)}"; $(RENDER_COMMON); \
	manifest="$$($(RENDER_PY) k8s/render.py "$${OVERLAY:-k8s/overlays/gpu-spot}" --command=evaluate --name="$$run" \
		"$$@" --set=model="$${MODEL:-$$JOB_DIR/model}" --set=data="$$DATA" \
		--set=output="$${OUTPUT:-$$JOB_DIR/eval}" --set=split="$$SPLIT")" && $(APPLY)

# Vertex AI custom training (k8s/vertex.py): the same image and trainer flags, no cluster needed.
submit-vertex:
	@if [ -z "$$DATA" ] || [ -z "$$JOB_DIR" ]; then echo "usage: make submit-vertex DATA=gs://.../dataset.json JOB_DIR=gs://.../runs/NAME [REGION=us-central1] [GPUS=1] [ACCELERATOR=nvidia-l4] [WORKERS=1] [SPOT=1] [GSA=...] [TENSORBOARD=projects/.../tensorboards/ID] [EXPERIMENT=...] [ARGS='--epochs=2'] [RUN=name] [DRY_RUN=1]" >&2; exit 2; fi
	@$(CHECK_IMAGE); run="$${RUN:-train-$(RUN_STAMP)}"; set -f; set -- --image="$$IMAGE" --gpus="$$GPUS" \
		--accelerator="$$ACCELERATOR" --workers="$$WORKERS"; \
	if [ -n "$$SPOT" ]; then set -- "$$@" --spot; fi; \
	if [ -n "$$GSA" ]; then set -- "$$@" --service-account-email="$$GSA"; fi; \
	if [ -n "$$TENSORBOARD" ]; then set -- "$$@" --tensorboard="$$TENSORBOARD"; fi; \
	if [ -n "$$EXPERIMENT" ]; then set -- "$$@" --experiment="$$EXPERIMENT"; fi; \
	for arg in $$ARGS; do set -- "$$@" "--set=$${arg#--}"; done; \
	spec="$$($(RENDER_PY) k8s/vertex.py "$$@" --set=data="$$DATA" --set=job_dir="$$JOB_DIR")" && \
	if [ -n "$$DRY_RUN" ]; then printf '%s\n' "$$spec"; \
	else file=$$(mktemp); printf '%s\n' "$$spec" > "$$file" && \
		$(GCLOUD) ai custom-jobs create --region="$$REGION" --display-name="$$run" --config="$$file"; \
		code=$$?; rm -f "$$file"; exit $$code; fi

# Hyperparameter tuning (configs/search_space.yaml, rendered by k8s/tune.py): Katib in the cluster,
# or Vertex AI's HyperparameterTuningJob. Each trial trains on its own job_dir under JOB_DIR.
submit-tune:
	@if [ -z "$$DATA" ] || [ -z "$$JOB_DIR" ]; then echo "usage: make submit-tune DATA=gs://.../dataset.json JOB_DIR=gs://.../tune/NAME [GPUS=1] [ACCELERATOR=nvidia-l4] [ARGS='--epochs=5'] [RUN=name] [DRY_RUN=1]" >&2; exit 2; fi
	@$(CHECK_IMAGE); run="$${RUN:-tune-$(RUN_STAMP)}"; set -f; set -- --image="$$IMAGE" --gpus="$$GPUS" \
		--accelerator="$$ACCELERATOR"; for arg in $$ARGS; do set -- "$$@" "--set=$${arg#--}"; done; \
	manifest="$$($(RENDER_PY) k8s/tune.py --target=katib --name="$$run" "$$@" --set=data="$$DATA" \
		--set=job_dir="$$JOB_DIR")" && \
	if [ -n "$$DRY_RUN" ]; then printf '%s\n' "$$manifest"; \
	else printf '%s\n' "$$manifest" | $(KUBECTL) apply -f - && echo "submitted $$run: $(KUBECTL) get experiment $$run; the best \
		trial: $(KUBECTL) get experiment $$run -o jsonpath='{.status.currentOptimalTrial}'"; fi

submit-vertex-tune:
	@if [ -z "$$DATA" ] || [ -z "$$JOB_DIR" ]; then echo "usage: make submit-vertex-tune DATA=gs://.../dataset.json JOB_DIR=gs://.../tune/NAME [REGION=us-central1] [GPUS=1] [ACCELERATOR=nvidia-l4] [SPOT=1] [GSA=...] [ARGS='--epochs=5'] [RUN=name] [DRY_RUN=1]" >&2; exit 2; fi
	@$(CHECK_IMAGE); run="$${RUN:-tune-$(RUN_STAMP)}"; set -f; set -- --image="$$IMAGE" --gpus="$$GPUS" \
		--accelerator="$$ACCELERATOR"; if [ -n "$$SPOT" ]; then set -- "$$@" --spot; fi; \
	if [ -n "$$GSA" ]; then set -- "$$@" --service-account-email="$$GSA"; fi; \
	for arg in $$ARGS; do set -- "$$@" "--set=$${arg#--}"; done; \
	spec="$$($(RENDER_PY) k8s/tune.py --target=vertex "$$@" --set=data="$$DATA" --set=job_dir="$$JOB_DIR")" && \
	if [ -n "$$DRY_RUN" ]; then printf '%s\n' "$$spec"; \
	else file=$$(mktemp); printf '%s\n' "$$spec" > "$$file" && \
		$(GCLOUD) ai hp-tuning-jobs create --region="$$REGION" --display-name="$$run" --config="$$file"; \
		code=$$?; rm -f "$$file"; exit $$code; fi

# The GPU-node benchmark (bench/gpu_node.py, docs/benchmarks.md §4): here, or as a Job on one GPU node.
bench-gpu: install
	$(PY) -m bench.gpu_node --output=bench_output

submit-bench:
	@if [ -z "$$OUTPUT" ]; then echo "usage: make submit-bench IMAGE=... OUTPUT=gs://.../bench [ACCELERATOR=nvidia-l4] [GPUS=1] [RUN=name] [DRY_RUN=1]" >&2; exit 2; fi
	@$(CHECK_IMAGE); run="$${RUN:-bench-$(RUN_STAMP)}"; $(RENDER_COMMON); \
	manifest="$$($(RENDER_PY) k8s/render.py k8s/bench --command=bench --name="$$run" "$$@" \
		--set=output="$$OUTPUT")" && $(APPLY)

status:
	$(KUBECTL) get cronjobs,jobs,pods -l $(SELECTOR)
	-@$(KUBECTL) get jobsets -l $(SELECTOR) 2>/dev/null

logs:
	@if [ -z "$$RUN" ]; then echo "usage: make logs RUN=name [FOLLOW=1] [TAIL=200]" >&2; exit 2; fi
	$(KUBECTL) logs -l "app.kubernetes.io/instance=$$RUN" --all-containers --prefix --tail="$$TAIL" \
		--max-log-requests=32 $${FOLLOW:+--follow}

wait:
	@if [ -z "$$RUN" ]; then echo "usage: make wait RUN=name [TIMEOUT=6h]" >&2; exit 2; fi
	KUBECTL="$(KUBECTL)" bash k8s/wait.sh "$$RUN" "$$TIMEOUT"

# Benchmarks of issue 6 (docs/benchmarks.md): input pipeline, training step, prepare's memory.
# Results (JSON + PNG) in bench_output/. Run on a quiet machine: the numbers are rates.
bench: install
	$(PY) -m bench.input_pipeline --rounds=7 --output=bench_output
	$(PY) -m bench.train_step --rounds=7 --output=bench_output
	$(PY) -m bench.train_step --rounds=7 --max_side=225 --output=bench_output
	$(PY) -m bench.train_step --rounds=7 --model_threads=1 --output=bench_output
	$(PY) -m bench.prepare_memory --output=bench_output
	$(PY) -m bench.prepare_scale --images=4000 --beam_images=2000 --rounds=3 --num_shards=4 --output=bench_output
	$(PY) -m bench.feature_cache --images=stripes --output=bench_output --per_class=2000
	$(PY) -m bench.feature_cache --workers=2 --per_class=600 --batch_size=32 --output=bench_output
	$(PY) -m bench.sigterm --output=bench_output
	$(PY) -m bench.evaluate_classes --output=bench_output
	$(PY) -m bench.prepare_plan --output=bench_output
	$(PY) -m bench.predict_scale --images=3000 --output=bench_output
