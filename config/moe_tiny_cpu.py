"""The paper's MoE layout (spec, "Architecture": 1 dense + MoE layers, shared + routed top-k experts,
GQA) scaled down to train on a 2-core CPU in a few minutes on the byte-level default dataset.

    python train.py config/moe_tiny_cpu.py
    torchrun --standalone --nproc_per_node=2 train.py config/moe_tiny_cpu.py

vocab_size is not set: train.py takes it from the dataset's meta.json."""
out_dir = "out-moe-tiny"
# model: d=128, 1 dense + 3 MoE layers, 4 query / 2 key-value heads (the paper's 2:1 GQA)
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
block_size = 128
n_dense_layers = 1
n_experts = 16  # routed experts (paper: 144)
n_shared_experts = 1  # (paper: 1)
moe_top_k = 4  # (paper: 8 of 144; fewer of fewer here)
expert_hidden = 64  # (paper: 544 at d=768, ~0.7 d); active width (4 + 1) * 64 = 320 vs the dense 384
moe_aux_weight = 0.01
# NITP: target layer ~20% of depth = block 1 (the dense one), lambda 1.0 (paper)
nitp_layer = 1
nitp_weight = 1.0
# training: 16 x 128 = 2,048 tokens per step
batch_size = 16
max_iters = 600
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
lr_schedule = "wsd"
eval_interval = 200
eval_iters = 10
log_interval = 20
device = "cpu"
dtype = "float32"  # bf16 matmuls are emulated, and slow, on most CPUs
compile = False  # inductor spends ~1 min compiling on 2 cores, more than it saves in a run this short
