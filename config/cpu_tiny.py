"""A model small enough to try every knob on a laptop CPU in about a minute (the defaults of
train.py are the README's ~5 minute run)."""
n_layer = 4
n_embd = 64
n_head = 4
block_size = 64
batch_size = 16
max_iters = 200
eval_interval = 50
warmup_iters = 20
