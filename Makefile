# The two commands of the README: `make pipeline` (the main job) and `make test`.
PY ?= python3
TORCH ?= torch==2.13.0

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	@$(PY) -m pip install -q -r requirements.txt

test: setup
	$(PY) -m pytest -q test_all.py

# The main job at the default CPU preset: Stage I SFT from the shipped base, then both judged side by side.
pipeline: setup
	$(PY) sft.py --out_dir=runs/sft $(ARGS)
	$(PY) rewards.py diagnose --ckpt=checkpoints/base_small.safetensors --ckpt=runs/sft/ckpt.safetensors --out=runs/diagnose --overwrite=true

# How the shipped checkpoints were made (each from scratch, on 2 CPU cores).
base: setup
	$(PY) sft.py --init= --data=web --lr=1e-3 --steps=2000 --warmup=100 --ema_decay=0.999 --ckpt_every=100 --out_dir=runs/base
	cp runs/base/ckpt.safetensors checkpoints/base_small.safetensors

reward_model: setup
	$(PY) rewards.py train_rm --out=checkpoints/reward_model.safetensors --overwrite=true

.PHONY: setup test pipeline base reward_model
