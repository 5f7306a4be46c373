# Set-up and entry points. `make demo` and `make test` create .venv when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# uv ignores pip's configuration: hand it the local wheel folder pip is configured with (CPU torch).
FIND_LINKS ?= $(or $(shell pip config get global.find-links 2>/dev/null),$(shell python3 -m pip config get global.find-links 2>/dev/null),/opt/wheels)
UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
DEMO_OUT ?= demo-output
PYTEST_ARGS ?=

.PHONY: venv demo test lint test-data bench check-platforms lock weights weights-teeth-head weights-brain clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-nodeps.txt pyproject.toml
	@test -x "$(UV)" || python3 -m pip install --quiet --user uv
	@test -d $(VENV) || $(UV) venv --quiet --python 3.11 $(VENV)
	$(UV) pip install --quiet -p $(VENV) --compile-bytecode --find-links "$(FIND_LINKS)" -r requirements.lock
	$(UV) pip install --quiet -p $(VENV) --compile-bytecode --no-deps -r requirements-nodeps.txt
	$(UV) pip install --quiet -p $(VENV) --compile-bytecode --no-deps -e .
	@touch $@

# Segment Teeth headlessly on the bundled demo volume; results land in $(DEMO_OUT)/.
demo: venv
	$(VENV)/bin/deepsegrecon teeth Resources/Data/demo_cbct.nrrd -o $(DEMO_OUT) --mrb
	@ls -1 $(DEMO_OUT)

test: venv test-data lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff, and the layers as import-linter contracts (pyproject.toml): the engine imports neither the scene adapter,
# MRML, Qt nor a Slicer module, no capability imports another, no import cycle (lazy imports count)
lint: venv
	$(VENV)/bin/ruff check DeepSegRecon Testing
	$(VENV)/bin/lint-imports

# Debian's invesalius-examples ships Cranium.inv3, the real head CT of the teeth-on-real-anatomy tests and the
# teeth_real_cranium benchmark. Installed when it is missing and apt-get can run as root; never fails the build
# (the tests that need it are skipped and say why). --path-include: images that drop /usr/share/doc keep it.
CRANIUM ?= /usr/share/doc/invesalius-examples/examples/Cranium.inv3
APT_GET ?= apt-get
APT_INSTALL = DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends \
	-o 'DPkg::Options::=--path-include=/usr/share/doc/invesalius-examples/*' invesalius-examples
test-data:
	@if [ ! -f "$(CRANIUM)" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v $(firstword $(APT_GET)) >/dev/null 2>&1; then \
			echo "installing Debian's invesalius-examples (Cranium.inv3, a real head CT for the teeth tests)"; \
			{ $(APT_INSTALL) >/dev/null 2>&1 || { $(APT_GET) update -qq >/dev/null 2>&1 && \
				$(APT_INSTALL) >/dev/null 2>&1; }; } || \
				echo "could not install invesalius-examples: the tests that need Cranium.inv3 will be skipped"; \
		else \
			echo "$(CRANIUM) is missing (apt-get install invesalius-examples as root): the tests that need it" \
				"will be skipped"; \
		fi; \
	fi

bench: venv
	$(PY) Testing/Benchmarks/run_benchmarks.py --out bench-results

# Does every module's Python package list (DeepSegReconCommon/Dependencies.py, from the lock) install from wheels on
# Slicer 5.10's Python 3.12 for Linux, Windows and macOS arm64? Needs the package index; make test runs it too.
check-platforms: venv
	UV="$(UV)" $(PY) Testing/Python/platform_check.py

# Re-pin requirements.lock from requirements.in.
lock:
	$(UV) pip compile -q --no-header --find-links "$(FIND_LINKS)" requirements.in -o requirements.lock

# Reproduce the shipped teeth weights in $(WEIGHTS_OUT) (see README: trained on synthetic phantoms only):
# phantom-v1, two fine-tunes of it, and phantom-v2 = their equal-share average. Copy the version folders
# into Resources/Models/teeth/ to ship them.
WEIGHTS_OUT ?= build/teeth-weights
TEETH_FT := $(PY) -m deepsegrecon.teeth.train --out $(WEIGHTS_OUT) --device auto --seed 0 --lr 0.0008 \
	--init-from $(WEIGHTS_OUT)/teeth/phantom-v1 --eval-seeds
WEIGHTS_ENV := DEEPSEGRECON_HOME=$(WEIGHTS_OUT)/home DEEPSEGRECON_BUILTIN_MODELS=$(WEIGHTS_OUT)/none
weights: venv
	$(VENV)/bin/deepsegrecon train-teeth-phantoms --out $(WEIGHTS_OUT) --minutes 150 --device auto --seed 0
	$(TEETH_FT) --minutes 100 --version phantom-v1-ft100
	$(TEETH_FT) --minutes 60 --version phantom-v1-ft60
	for v in phantom-v1 phantom-v1-ft100 phantom-v1-ft60; do \
		$(WEIGHTS_ENV) $(VENV)/bin/deepsegrecon models import $(WEIGHTS_OUT)/teeth/$$v || exit 1; done
	$(WEIGHTS_ENV) $(VENV)/bin/deepsegrecon models average teeth phantom-v1 phantom-v1-ft100 phantom-v1-ft60 \
		--name phantom-v2
	cp -r $(WEIGHTS_OUT)/home/models/teeth/phantom-v2 $(WEIGHTS_OUT)/teeth/

# phantom-v3: phantom-v2 fine-tuned on head phantoms, jaw phantoms and real scans without teeth
# (teeth/train_head.py). The shipped run had two parts: 35 min on an earlier head generator (skull as dim as jaw
# cortex), then 60 min on the current one (--warm-start); this target runs the current one from phantom-v2.
# phantom-v4 (the default): phantom-v3 fine-tuned 50 min on one thread with 24 more heads (neck and lower-arch fields)
# and 56 jaw phantoms, the head phantoms labelled only inside the imaged field.
HEAD_OUT ?= build/teeth-head
weights-teeth-head: venv
	nice $(PY) -m deepsegrecon.teeth.train_head prepare --cache $(HEAD_OUT)/cache --heads 120 --first 200 --jaws 24
	nice $(PY) -m deepsegrecon.teeth.train_head train --cache $(HEAD_OUT)/cache --out $(HEAD_OUT)/out \
		--init-from Resources/Models/teeth/phantom-v2 --minutes 95 --lr 3e-4 --version phantom-v3
	nice $(PY) -m deepsegrecon.teeth.train_head prepare --cache $(HEAD_OUT)/cache --heads 24 --first 500 --jaws 56 \
		--fields below,lower,below,large
	nice $(PY) -m deepsegrecon.teeth.train_head train --cache $(HEAD_OUT)/cache --out $(HEAD_OUT)/out \
		--init-from $(HEAD_OUT)/out/teeth/phantom-v3 --minutes 50 --lr 1e-4 --threads 1 --version phantom-v4

# Reproduce the default brain-tumor weights (real-v1: real BraTS patients of ../shared/data, fixed split) in
# $(BRAIN_OUT)/store/brain-tumor/real-v1; resumable (add --resume). A wall-clock budget, so the step count depends on
# the machine. The paper's configuration on a GPU: BRAIN_ARGS="--device cuda --init-filters 32 --crop 96 128 96".
BRAIN_OUT ?= build/brain-weights
BRAIN_ARGS ?= --threads 1
weights-brain: venv
	nice $(PY) -m deepsegrecon.brain.train_real --out $(BRAIN_OUT) --minutes 110 --val-every 300 $(BRAIN_ARGS)

# The SART refiner (cbct-recon v4: v2's DIF-Gaussian weights + refiner.pt, method sart-unet): 180 training pairs
# cached in $(REFINER_OUT)/cache (about 10 min), 40 CPU minutes of training on one thread, then the version is
# evaluated and written to $(REFINER_OUT)/store/cbct-recon/v4. Copy it into Resources/Models/cbct-recon/ to ship it.
REFINER_OUT ?= build/cbct-refiner
.PHONY: weights-cbct-refiner
weights-cbct-refiner: venv
	OMP_NUM_THREADS=1 ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 nice -n 10 $(PY) -m deepsegrecon.cbct.train_refiner \
		--pairs 180 --minutes 40 --seed 0 --cache $(REFINER_OUT)/cache --out $(REFINER_OUT)/out --version v4 \
		--store $(REFINER_OUT)/store

clean:
	rm -rf $(VENV) $(DEMO_OUT) bench-results .pytest_cache
