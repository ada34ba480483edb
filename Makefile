# The two commands of the README: `make pipeline` (the main job) and `make test`.
PY ?= python3
TORCH ?= torch==2.13.0

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	@$(PY) -m pip install -q -r requirements.txt

test: setup
	$(PY) -m pytest -q test_all.py

# Pretrain the base from scratch on web data (the shipped checkpoints/base_small.safetensors came from this).
base: setup
	$(PY) sft.py --init= --data=web --lr=1e-3 --steps=1800 --warmup=100 --ema_decay=0.999 --ckpt_every=100 --out_dir=runs/base

# The main job: Stage I SFT from the shipped base, then samples of both checkpoints.
pipeline: setup
	$(PY) sft.py --out_dir=runs/sft $(ARGS)
	$(PY) model.py --ckpt=checkpoints/base_small.safetensors --out=runs/sft/base_samples.gif --overwrite=true
	$(PY) model.py --ckpt=runs/sft/ckpt.safetensors --out=runs/sft/sft_samples.gif --overwrite=true

.PHONY: setup test base pipeline
