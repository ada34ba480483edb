# The two commands of the README: `make pipeline` (the main job) and `make test`.
PY ?= python3
TORCH ?= torch==2.13.0
# POLICY=wan: the pipeline (and `make base`) on diffusers' Wan at the small DiT's size instead of the DiT
POLICY ?= dit
ifeq ($(filter $(POLICY),dit wan),)
$(error POLICY=$(POLICY): choose dit (the small DiT) or wan (diffusers' Wan on pixels))
endif
BASE_CKPT = $(if $(filter wan,$(POLICY)),checkpoints/base_wan.safetensors,checkpoints/base_small.safetensors)
RUN ?= $(if $(filter wan,$(POLICY)),runs/pipeline_wan,runs/pipeline)
# Stage II on the pixel Wan: 15 iterations at lr 3e-4 with AWM's draws near the noise, where Wan's denoiser reads
# the motion words (15 at 1e-4 moved nothing), with the EMA's decay warmed up and one optimizer step a pass, as when
# it was measured (docs/results.md, Wan through the stages)
# On the DiT, 13 iterations of the default step: at 10 the floor was still slowing it after a dip of its probe, 12
# and 15 gain alike (docs/results.md, Two steps a pass)
RL_STEPS = $(if $(filter wan,$(POLICY)),--iters=15 --lr=3e-4 --draw_t_mean=-2.0 --ema_warmup=true --minibatches=1,--iters=13)

setup:
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	@$(PY) -m pip install -q -r requirements.txt

# The optional extra behind adapters.py (diffusers' Wan), pinned beside the torch already installed, which it keeps.
setup-wan: setup
	@$(PY) -m pip install -q -r requirements-wan.txt "torch==$$($(PY) -c 'import torch; print(torch.__version__)')"

test: setup-wan
	$(PY) -m pytest -q test_all.py

# Reliability, at full strength: 10 kill -9 trials per stage (the suite runs 1), then the torchrun tests 20 times.
killtest: setup
	POSTFLOW_KILL_TRIALS=10 $(PY) -m pytest -q -s test_all.py -k kill_minus_9
	for i in $$(seq 20); do $(PY) -m pytest -q test_all.py -k "two_ranks or torchrun or fsdp or nodes" || exit 1; done

# The main job at the default CPU preset: the three stages from the shipped base, then all four judged side by side
# (a diagnosis already made of the same file, settings and code is read back: from runs/diagnose_cache, and the base's
# from checkpoints/diagnoses, shipped), then one page of it all: $(RUN)/report.html (offline, self-contained) and
# report.md. Its CPU budget (docs/results.md, Pipeline at the CPU budget, against the full recipe): Stage I 800
# steps of 16 clips (the script's default: 32), Stage II 13 iterations (30), Stage III 60 steps (150) on pairs of 48
# prompts (64). Stage II runs all its iterations (--max_minutes=0: its time guard would cut a slower machine short
# and change the table). Each run replaces $(RUN) (pass RUN=runs/other to keep an earlier one).
pipeline: $(if $(filter wan,$(POLICY)),setup-wan,setup)
	@mkdir -p $(RUN) && date +%s > $(RUN)/started_at
	$(PY) sft.py --init=$(BASE_CKPT) --out_dir=$(RUN)/sft --overwrite=true --batch_size=16
	$(PY) reward_rl.py --init=$(RUN)/sft/ckpt.safetensors --out_dir=$(RUN)/rl --overwrite=true --max_minutes=0 $(RL_STEPS)
	$(PY) preference.py --init=$(RUN)/rl/ckpt.safetensors --out_dir=$(RUN)/dpo --overwrite=true --pair_prompts=48 --steps=60 --warmup=6
	$(PY) diagnose.py --ckpt=$(BASE_CKPT) --ckpt=$(RUN)/sft/ckpt.safetensors \
		--ckpt=$(RUN)/rl/ckpt.safetensors --ckpt=$(RUN)/dpo/ckpt.safetensors --out=$(RUN)/diagnose --overwrite=true \
		--cache=runs/diagnose_cache
	$(PY) report.py --run=$(RUN) --overwrite=true

# The diagnostic loop closed: the same stages, but each stage's diagnosis picks the axis the next one is turned toward
# (`diagnose.py advise` prints its flags; the decisions land in $(DRIVEN)/advice_{rl,dpo}.json and the report). Where a
# diagnosis asks for Stage I, the next stage fits Stage I's curated clips 4x harder, its rewards left as they are.
# SFT=path starts from a Stage I checkpoint you have (e.g. runs/pipeline/sft/ckpt.safetensors) instead of training one.
DRIVEN ?= runs/driven
SFT ?=
pipeline_driven: setup
	@mkdir -p $(DRIVEN) && date +%s > $(DRIVEN)/started_at
	$(if $(SFT),cp $(SFT) $(DRIVEN)/sft_input.tmp && rm -rf $(DRIVEN)/sft && mkdir -p $(DRIVEN)/sft && \
		mv $(DRIVEN)/sft_input.tmp $(DRIVEN)/sft/ckpt.safetensors,$(PY) sft.py --out_dir=$(DRIVEN)/sft --overwrite=true)
	$(PY) diagnose.py --ckpt=$(DRIVEN)/sft/ckpt.safetensors --out=$(DRIVEN)/diagnose_sft --overwrite=true --cache=runs/diagnose_cache
	$(PY) diagnose.py advise --diagnose=$(DRIVEN)/diagnose_sft --stage=rl --out=$(DRIVEN)/advice_rl.json --overwrite=true > $(DRIVEN)/rl.flags
	$(PY) reward_rl.py --init=$(DRIVEN)/sft/ckpt.safetensors --out_dir=$(DRIVEN)/rl --overwrite=true --max_minutes=0 $$(cat $(DRIVEN)/rl.flags)
	$(PY) diagnose.py --ckpt=$(DRIVEN)/rl/ckpt.safetensors --out=$(DRIVEN)/diagnose_rl --overwrite=true --cache=runs/diagnose_cache
	$(PY) diagnose.py advise --diagnose=$(DRIVEN)/diagnose_rl --stage=dpo --out=$(DRIVEN)/advice_dpo.json --overwrite=true > $(DRIVEN)/dpo.flags
	$(PY) preference.py --init=$(DRIVEN)/rl/ckpt.safetensors --out_dir=$(DRIVEN)/dpo --overwrite=true $$(cat $(DRIVEN)/dpo.flags)
	$(PY) diagnose.py --ckpt=checkpoints/base_small.safetensors --ckpt=$(DRIVEN)/sft/ckpt.safetensors \
		--ckpt=$(DRIVEN)/rl/ckpt.safetensors --ckpt=$(DRIVEN)/dpo/ckpt.safetensors --out=$(DRIVEN)/diagnose --overwrite=true \
		--cache=runs/diagnose_cache
	$(PY) report.py --run=$(DRIVEN) --overwrite=true

# How the shipped checkpoints were made. The shipped base: this command with DEVICE=cuda on one H100; its times
# on a GPU and on 2 CPU cores are in docs/results.md (Where fidelity was lost). Its 6000 steps (not 2000) are what
# lifts fidelity.
# POLICY=wan pretrains diffusers' Wan on pixels instead (below); RESUME=true continues a stopped
# run.
DEVICE ?= auto
RESUME ?= false
base: base_$(POLICY)

base_dit: setup
	$(PY) sft.py --init= --data=web --lr=1e-3 --steps=6000 --warmup=100 --ema_decay=0.999 --ckpt_every=100 --out_dir=runs/base \
		--device=$(DEVICE) --resume=$(RESUME)
	$(PY) -c "import checkpoint; checkpoint.export_half('runs/base/ckpt.safetensors', \
		'checkpoints/base_small.safetensors')"

# The pixel Wan's base: WanTransformer3DModel at the small DiT's shape (adapters.WanConfig's
# defaults: 8x8 patches, 128 tokens a clip, 6 blocks 192 wide, 4.03M parameters) with learned words,
# predicting the clean clip as the DiT does (adapters.py says why), drawn from its seed once (a
# resume needs the same init file), then pretrained as the DiT's base is, on the web data.
WAN_STEPS ?= 6000
base_wan: setup-wan runs/wan_base_init.safetensors
	$(PY) sft.py --init=runs/wan_base_init.safetensors --data=web --lr=1e-3 --steps=$(WAN_STEPS) \
		--warmup=100 --ema_decay=0.999 --ckpt_every=100 --out_dir=runs/wan_base --device=$(DEVICE) \
		--resume=$(RESUME)
	$(PY) -c "import checkpoint; checkpoint.export_half('runs/wan_base/ckpt.safetensors', \
		'checkpoints/base_wan.safetensors')"

runs/wan_base_init.safetensors:
	$(PY) adapters.py --source=pixel --text=learned --target=clean --lora_rank=0 --frames=8 --size=32 \
		--out=$@

sft_checkpoint: setup
	$(PY) sft.py --init=checkpoints/base_small.safetensors --out_dir=runs/sft
	$(PY) -c "import checkpoint; checkpoint.export_half('runs/sft/ckpt.safetensors', \
		'checkpoints/sft_small.safetensors')"

reward_model: setup
	$(PY) judge.py train --out=checkpoints/reward_model.safetensors --overwrite=true

# The base's diagnosis, shipped beside it (checkpoints/diagnoses, keyed by the base's bytes, the judge's, the settings
# and the code that samples and scores), so a fresh clone's `make pipeline` reads it instead of redoing it; after an
# edit to the code that samples and scores (diagnose.code_version) the key misses and the pipeline recomputes it (about a minute).
base_diagnosis: setup
	rm -rf checkpoints/diagnoses.new
	$(PY) diagnose.py --ckpt=checkpoints/base_small.safetensors --out=runs/base_diagnosis --overwrite=true \
		--cache=checkpoints/diagnoses.new --shipped=
	rm -rf checkpoints/diagnoses && mv checkpoints/diagnoses.new checkpoints/diagnoses

# Why each part of Stage II exists: one part taken out at a time, the floor included (bench.ABLATIONS' runs, each
# a folder under runs/ablations; an interrupted run of this target picks up where it stopped).
ablations: setup
	$(PY) bench.py ablations

# This machine's matmul peak and how close a train step and guided sampling come to it: runs/bench/speed.json.
bench: setup
	$(PY) bench.py speed

benchmarks: setup
	$(PY) bench.py heads
	$(PY) bench.py dpo_memory

# Stage II's update rules raced on equal terms from sft_small (race.RACED: AWM without and with the floor on the old
# defaults, the default, the floor turning the curated term or the KL, DiffusionNFT with the floor; 3 seeds each,
# 12,000 network evaluations per run, diagnose's 64 held-out clips after each quarter; two runs at once):
# runs/race/race.{json,md}, a section of the next report. Its time on 2 CPU cores: docs/results.md, Update rules raced.
race: setup
	$(PY) race.py

.PHONY: setup setup-wan test killtest pipeline pipeline_driven base base_dit base_wan sft_checkpoint reward_model base_diagnosis benchmarks ablations \
	bench race
