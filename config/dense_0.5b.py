"""The paper's dense 0.5B shape (spec, "Architecture"): d=896, 24 layers, 14 query / 2 KV heads,
NITP target layer 5 of 24, lambda 1.0. For GPUs:

    torchrun --standalone --nproc_per_node=8 train.py config/dense_0.5b.py --dataset=YOUR_DATASET
"""
out_dir = "out-dense_0.5b"  # its own folder: a run of another preset (or of the defaults) is not replaced
n_layer = 24
n_embd = 896
n_head = 14
n_kv_head = 2
mlp_hidden = 4864  # the spec gives no FFN width for this model; ~5.4 d
block_size = 4096
nitp_layer = 5
nitp_weight = 1.0
# optimiser and schedule as in the paper: AdamW (0.9, 0.95), wd 0.1, clip 1.0, WSD with 2000 warmup steps
batch_size = 8
gradient_accumulation_steps = 4
max_iters = 20000
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 2000
lr_schedule = "wsd"
decay_frac = 0.2
eval_interval = 1000
eval_iters = 50
log_interval = 10
compile = True
