"""NTP vs NITP continued pre-training of SmolLM2-135M (LlamaForCausalLM: 30 layers, d=576, 9 q / 3 kv heads, tied,
vocabulary 49152) on one GPU; the README's recipe runs it. The architecture comes from the checkpoint; the NITP
head is new and nitp_layer defaults to round(0.2 * 30) = 6. 64 sequences of 2048 tokens = 131k tokens per step,
1500 steps = 197M tokens (time not measured here).

    python train.py config/smollm2_135m_cpt.py                                          # NITP
    python train.py config/smollm2_135m_cpt.py --nitp_weight=0 --out_dir=out/smollm2_cpt_ntp   # NTP
"""
init_from = "hf:checkpoints/SmolLM2-135M"  # huggingface-cli download HuggingFaceTB/SmolLM2-135M --local-dir THERE
dataset = "smollm2_cpt"  # prepare_data.py --tokenizer=hf:checkpoints/SmolLM2-135M --name=smollm2_cpt
out_dir = "out/smollm2_cpt_nitp"
block_size = 2048  # SmolLM2's pre-training context (max_position_embeddings 8192)
batch_size = 16
gradient_accumulation_steps = 4
max_iters = 1500
learning_rate = 3e-4  # continued pre-training: far below a from-scratch peak, so the imported model is not undone
min_lr = 3e-5
warmup_iters = 100  # the optimizer state and the NITP head start fresh
eval_interval = 250
eval_iters = 50
compile = True
