# Every target creates .venv on first use, so a fresh machine needs nothing but Python 3.11 and pip.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install test test-slow demo bench bench-gpu reproduce-table1 ablation-table8 ablation-table6 finetune-table12 transfer-demo formats-table explain-demo fewshot-table demo-text pretrain-tiny pretrain-tiny-clip clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# Stage-1 throughput, TCA memory/time, and cached vs online training; each prints a markdown table.
bench: $(STAMP)
	mkdir -p results/bench
	$(PY) benchmarks/bench_extract.py --json results/bench/extract.json
	$(PY) benchmarks/bench_tca.py
	$(PY) benchmarks/bench_train.py

# On a CUDA machine: the CUDA-only tests, then training and extraction at ViT-B/16 8 frames for every
# storage format and the online path, one table of ratios (results/bench/gpu.json). Without CUDA it
# says so and exits 0; BENCH_GPU_ARGS="--device cpu --toy" runs the same logic on the CPU at toy sizes.
bench-gpu: $(STAMP)
	mkdir -p results/bench
	$(PY) benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

# --- recipes (pipelines/): each writes a markdown report with PNG plots; reruns skip finished stages.
K400_VARS = K400_ROOT="$(K400_ROOT)" K400_ANN="$(K400_ANN)" CLIP_B16="$(CLIP_B16)" CLIP_L14="$(CLIP_L14)" CLIP_L14_336="$(CLIP_L14_336)"
SMOKE_FLAG = $(if $(filter 1 yes true,$(SMOKE)),--smoke)

demo: $(STAMP)
	$(PY) pipelines/demo.py $(DEMO_ARGS)

reproduce-table1: $(STAMP)
	$(K400_VARS) $(PY) pipelines/reproduce_table1.py $(SMOKE_FLAG)

ablation-table8: $(STAMP)
	$(K400_VARS) $(PY) pipelines/ablation_table8.py $(if $(K400_ROOT),--k400)

# Table 6 (decoder depth, feature maps fed, pooled features): 9 decoders in one sweep over the demo's cache.
# TABLE6_ARGS passes flags, e.g. TABLE6_ARGS="--paper-values paper_table6.yaml --steps 250".
ablation-table6: $(STAMP)
	$(K400_VARS) $(PY) pipelines/ablation_table6.py $(if $(K400_ROOT),--k400) $(TABLE6_ARGS)

# Table 12: UCF-101 / HMDB-51 fine-tuned from the K400 checkpoints, the 3 official splits and their mean
# (results/table12.md + PNG). Without the data it says what it needs and exits 2; SMOKE=1 runs on generated videos.
T12_VARS = UCF101_ROOT="$(UCF101_ROOT)" UCF101_ANN="$(UCF101_ANN)" HMDB51_ROOT="$(HMDB51_ROOT)" HMDB51_ANN="$(HMDB51_ANN)" \
	CLIP_L14="$(CLIP_L14)" CLIP_L14_336="$(CLIP_L14_336)" K400_CKPT_L14="$(K400_CKPT_L14)" K400_CKPT_L14_336="$(K400_CKPT_L14_336)"

finetune-table12: $(STAMP)
	$(T12_VARS) $(PY) pipelines/finetune_table12.py $(SMOKE_FLAG)

# Table 12 offline: a decoder trained on 7 synthetic classes fine-tuned to the 7 others from 16 videos per class
# (init_from, pretrained lr x0.1 and x1.0) against training from scratch: results/transfer/table.md + transfer.png.
# 16 min on 2 cores (docs/recipes.md); SMOKE=1 runs it on a few videos and steps.
transfer-demo: $(STAMP)
	$(PY) pipelines/transfer_synthetic.py $(SMOKE_FLAG) $(TRANSFER_ARGS)

# The demo benchmark trained from every cache storage format (issue 9): results/formats/table.md + PNG.
# About an hour of CPU; SMOKE=1 runs the same recipe at toy size in about a minute.
formats-table: $(STAMP)
	$(PY) pipelines/format_accuracy.py $(SMOKE_FLAG) $(FORMATS_ARGS)

# Figure 4 on the synthetic benchmark: where the demo decoder's query attends (needs `make demo` first).
explain-demo: $(STAMP)
	$(PY) pipelines/explain_synthetic.py

# Few-shot (issue 11): top-1 against K videos per class for the X-CLIP, text-initialised linear and EVL heads,
# from one store pair (results/fewshot/table.md + top1_vs_k.png). SMOKE=1 runs it at toy size;
# FEWSHOT_ARGS passes flags, e.g. FEWSHOT_ARGS="--config C --shots 2,4 --train-store S --val-store V".
fewshot-table: $(STAMP)
	$(PY) pipelines/fewshot.py $(SMOKE_FLAG) $(FEWSHOT_ARGS)

# Does text help? The tiny CLIP zero-shot from class names, then few-shot curves at K = 1, 2, 4, 8 for the
# X-CLIP, text-initialised linear and EVL heads (results/demo_text/table.md + top1_vs_k.png; docs/fewshot.md).
demo-text: $(STAMP)
	$(PY) pipelines/fewshot.py --config configs/synthetic_text_demo.yaml --work runs/demo_text --out results/demo_text $(DEMO_TEXT_ARGS)

# The step-based command recorded in evl_cache/assets/tiny_vit/PRETRAIN.md (reproduces the committed weights' schedule).
PRETRAIN_ARGS ?= --seed 0 --steps 4036 --batch 48 --lr 0.002 --attn-weight 0.5 --obj-weight 4.0

pretrain-tiny: $(STAMP)
	$(PY) pipelines/pretrain_tiny.py --out evl_cache/assets/tiny_vit $(PRETRAIN_ARGS)

# The tiny CLIP: the tiny ViT's trunk locked, a text tower pretrained on captions of still frames.
pretrain-tiny-clip: $(STAMP)
	$(PY) pipelines/pretrain_tiny_clip.py --out evl_cache/assets/tiny_clip --seed 0

clean:
	rm -rf $(VENV) runs results build *.egg-info
