"""GPT-2 124M shape (12 layers, d=768, 12 heads, context 1024) with NITP, on FineWeb10B as llm.c's
GPT-2 124M reference run: ~0.5M tokens per step for 19,073 steps = 10B tokens. For 8 GPUs:

    # llm.c shards (dev/data/fineweb.py, or modded-nanogpt's cached copy) in data/fineweb10B/
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py
    torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py --nitp_weight=0 --out_dir=out-gpt2-124m-ntp

The model is this project's decoder (RoPE, RMSNorm, SwiGLU of width 2048, untied embeddings as in the
paper), not GPT-2's own blocks: 162M parameters (a 123.6M trunk with its embedding, and the 38.6M
lm_head), plus the 7.1M NITP head that only training uses. vocab_size comes from the shards (50257, padded to 50304).
NITP target: block 2 of 12 (~20% of depth, spec "Defaults"), lambda 1.0.

Batch: total_batch_size = 524,288 tokens per step (2^19, as llm.c and nanoGPT). On 8 GPUs
32 x 1024 x 8 = 262,144 tokens per micro-step, so train.py derives 2 accumulation steps; on fewer
GPUs it derives more and the optimisation is the same. batch_size=32 keeps a step well inside an
80 GB H100 (logits alone are B x 1024 x 50304 in fp32); on a 141 GB H200 --batch_size=64 gives
llm.c's exact 64 x 1024 x 8 with no accumulation.

Schedule: cosine, warmup 700 steps, peak 6e-4 down to 6e-5, as the llm.c / nanoGPT reference runs:
the NTP baseline of this preset can then be checked against their published loss and HellaSwag
curves before NITP is compared with it. The paper's schedule is one flag away:
--lr_schedule=wsd --decay_frac=0.2.
"""
out_dir = "out-gpt2-124m"
train_shards = "data/fineweb10B/fineweb_train_*.bin"
val_shards = "data/fineweb10B/fineweb_val_*.bin"
# model: GPT-2 124M shape
n_layer = 12
n_embd = 768
n_head = 12
block_size = 1024
# NITP (paper defaults)
nitp_layer = 2
nitp_weight = 1.0
# batch: 2^19 tokens per optimizer step over all processes
batch_size = 32
total_batch_size = 524288
# 10B tokens / 524,288 tokens per step
max_iters = 19073
# AdamW (spec: betas (0.9, 0.95), weight decay 0.1, clip 1.0)
learning_rate = 6e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "cosine"
warmup_iters = 700
# evaluation: 40 batches x 32 x 1024 = 1.3M validation tokens every 250 steps (~2 min on 8 H100s)
eval_interval = 250
eval_iters = 40
log_interval = 10
# system
dtype = "bfloat16"
compile = True
