"""The paper's 3B-A0.5B MoE (spec, "Architecture"): d=768, 1 dense + 16 MoE layers, 144 routed experts
of width 544 plus 1 shared, top-8, GQA 8 query / 4 key-value heads, context 8192, NITP target 4/17,
lambda 1.0. For GPUs:

    torchrun --standalone --nproc_per_node=8 train.py config/moe_3b_a05b.py --dataset=YOURS

The paper used the Qwen2 tokenizer (vocab 152,064); vocab_size comes from the dataset's meta.json.
Its optimiser (spec, "Architecture"): AdamW, betas (0.9, 0.95), weight decay 0.1, clip 1.0, WSD schedule
with 2,000 warmup steps and the last 20% decaying, peak lr 4.2e-4 to 8.7e-4 depending on the model.
Neither its batch size nor its step count is given in the spec: the values below are placeholders."""
out_dir = "out-moe-3b-a05b"
n_layer = 17
n_dense_layers = 1
n_embd = 768
n_head = 8
n_kv_head = 4
block_size = 8192
mlp_hidden = 10944  # the dense first layer's FFN (spec: "dense FFN size 10944")
n_experts = 144
n_shared_experts = 1
moe_top_k = 8
expert_hidden = 544
moe_renorm = False  # DeepSeek-V2: routing weights are the raw softmax scores
# The spec gives no alpha. DeepSeek-V2 used 0.003 per MoE layer, summed over layers; model.py averages
# over the MoE layers instead, so the same per-layer pressure is 0.003 * 16 = 0.048.
moe_aux_weight = 0.048
nitp_layer = 4
nitp_weight = 1.0
nitp_loss = "cosine"
# optimiser (paper)
learning_rate = 6e-4  # within the paper's 4.2e-4 .. 8.7e-4
min_lr = 6e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
lr_schedule = "wsd"
warmup_iters = 2000
decay_frac = 0.2
# batch: placeholders, 8 GPUs x 2 x 8192 x 32 = 4.2M tokens per step
batch_size = 2
gradient_accumulation_steps = 32
max_iters = 20000
eval_interval = 1000
eval_iters = 50
log_interval = 10
device = "auto"
dtype = "bfloat16"
compile = True
