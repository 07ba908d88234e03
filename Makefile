# The two commands of the README: `make demo` and `make test`. Both set up the environment
# first; nothing else is needed on a fresh machine with Python 3.10+.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU build of torch for machines without CUDA (installs from a local file on our dev machines).
TORCH_CPU := torch==2.13.0
# An interpreter that already has a CUDA torch lends it to the venv instead of being shadowed.
SYSTEM_CUDA_TORCH := $(shell $(PYTHON) -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 && echo yes)

# DeepSpeed's JIT-built CPU ops are cached per environment (not shared between checkouts).
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

DEMO ?= demo
DEMO_RANKS ?= 2
DEMO_STEPS ?= 60
DEMO_MODEL ?= bert-tiny
# `make demo DEMO_CONFIG=ds_configs/cpu_zero2_sparse_set.json` trains sparse (SET, 80%, ERK).
DEMO_CONFIG ?= ds_configs/cpu_zero2.json

.PHONY: setup demo demo-sparse demo-structured demo-sparse-structured demo-teacher demo-finetune demo-dynabert test \
	test-fast clean-demo

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(if $(SYSTEM_CUDA_TORCH),--system-site-packages) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
	    echo "keeping torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	@test -f $(DEMO)/data/meta.json || $(VENV)/bin/dist-sparse prepare-data --default-corpus \
	    --output $(DEMO)/data --vocab-size 8000 --seq-len 128
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed --num_gpus $(DEMO_RANKS) launchers/pretrain.py \
	    --deepspeed_config $(DEMO_CONFIG) --data $(DEMO)/data --model $(DEMO_MODEL) \
	    --output $(DEMO)/run --max-steps $(DEMO_STEPS) --eval-interval 20 --save-interval 20 --overwrite
	$(VENV)/bin/dist-sparse export $(DEMO)/run $(DEMO)/hf --overwrite
	@echo "demo done: TensorBoard logs in $(DEMO)/run/tensorboard, checkpoints in $(DEMO)/run/checkpoints,"
	@echo "  Hugging Face export in $(DEMO)/hf (AutoModelForMaskedLM.from_pretrained(\"$(DEMO)/hf\"))"

demo-sparse:
	$(MAKE) demo DEMO_CONFIG=ds_configs/cpu_zero2_sparse_set.json DEMO=demo-sparse
	$(VENV)/bin/dist-sparse inspect demo-sparse/run

# EarlyBERT on bert-mini: search, ticket, physical shrink and training on the smaller model.
demo-structured:
	$(MAKE) demo DEMO_CONFIG=ds_configs/cpu_zero2_earlybert.json DEMO=demo-structured DEMO_MODEL=bert-mini
	$(VENV)/bin/dist-sparse inspect demo-structured/run

# Both at once on AdamW: SET masks from the start, carried through EarlyBERT's shrink.
demo-sparse-structured:
	$(MAKE) demo DEMO_CONFIG=ds_configs/cpu_zero2_adamw_earlybert_set.json DEMO=demo-sparse-structured DEMO_MODEL=bert-mini
	$(VENV)/bin/dist-sparse inspect demo-sparse-structured/run

# Fine-tuning on the default task (is a State of the Union paragraph from before 1900?), from the
# demo's pre-trained run: a dense fine-tuned teacher, then SparseBERT (the pre-trained model pruned
# to 90% with GMP while distilling the teacher's logits, hidden states and attention), then the
# Hugging Face export of the sparse classifier. Runs `make demo` first when its run is missing.
FT_STEPS ?= 300
DYN_STEPS ?= 100
# the dense fine-tuned teacher of demo-finetune and demo-dynabert (made once)
demo-teacher: $(STAMP)
	@test -f $(DEMO)/run/checkpoints/latest || $(MAKE) demo
	@test -f $(DEMO)/task/meta.json || $(VENV)/bin/dist-sparse prepare-task --default-task \
	    --tokenizer $(DEMO)/data --output $(DEMO)/task --seq-len 128
	@test -f $(DEMO)/finetune-teacher/eval_results.json || PATH=$(abspath $(VENV))/bin:$$PATH deepspeed \
	    --num_gpus $(DEMO_RANKS) launchers/finetune.py \
	    --deepspeed_config ds_configs/cpu_zero2_finetune.json --task $(DEMO)/task --init $(DEMO)/run \
	    --output $(DEMO)/finetune-teacher --max-steps $(FT_STEPS) --eval-interval 100 --overwrite

demo-finetune: demo-teacher
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed --num_gpus $(DEMO_RANKS) launchers/finetune.py \
	    --deepspeed_config ds_configs/cpu_zero2_finetune_sparsebert.json --teacher $(DEMO)/finetune-teacher \
	    --task $(DEMO)/task --init $(DEMO)/run --output $(DEMO)/finetune-sparse --max-steps $(FT_STEPS) \
	    --eval-interval 100 --overwrite
	$(VENV)/bin/dist-sparse inspect $(DEMO)/finetune-sparse
	$(VENV)/bin/dist-sparse export $(DEMO)/finetune-sparse $(DEMO)/finetune-hf --overwrite
	@echo "demo-finetune done: validation metrics in $(DEMO)/finetune-teacher/eval_results.json (dense teacher) and"
	@echo "  $(DEMO)/finetune-sparse/eval_results.json (90% sparse student); the sparse classifier in $(DEMO)/finetune-hf"
	@echo "  (AutoModelForSequenceClassification.from_pretrained(\"$(DEMO)/finetune-hf\"))"

# DynaBERT: phase 1 (width) from the dense teacher, phase 2 (width and depth, ZeRO-3) from phase 1,
# then one sub-network exported as a standalone model. DEMO_RANKS=4 runs it on 4 ranks.
demo-dynabert: demo-teacher
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed --num_gpus $(DEMO_RANKS) launchers/finetune.py \
	    --deepspeed_config ds_configs/cpu_zero2_dynabert_phase1.json --teacher $(DEMO)/finetune-teacher \
	    --task $(DEMO)/task --init $(DEMO)/finetune-teacher --output $(DEMO)/dynabert-width \
	    --max-steps $(DYN_STEPS) --eval-interval 50 --overwrite
	PATH=$(abspath $(VENV))/bin:$$PATH deepspeed --num_gpus $(DEMO_RANKS) launchers/finetune.py \
	    --deepspeed_config ds_configs/cpu_zero3_dynabert_phase2.json --teacher $(DEMO)/dynabert-width \
	    --task $(DEMO)/task --init $(DEMO)/dynabert-width --output $(DEMO)/dynabert-depth \
	    --max-steps $(DYN_STEPS) --eval-interval 50 --overwrite
	$(VENV)/bin/dist-sparse inspect $(DEMO)/dynabert-depth
	$(VENV)/bin/dist-sparse export $(DEMO)/dynabert-depth $(DEMO)/dynabert-hf --width 0.5 --depth 0.5 --overwrite
	@echo "demo-dynabert done: every sub-network's validation metrics in $(DEMO)/dynabert-depth/eval_results.json;"
	@echo "  the width 0.5 / depth 0.5 sub-network as a standalone model in $(DEMO)/dynabert-hf"

test: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q -n 2 --dist loadfile tests

test-fast: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m pytest -q tests/unit

clean-demo:
	rm -rf $(DEMO)
