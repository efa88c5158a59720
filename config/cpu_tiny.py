"""A model small enough to try every knob on a CPU in seconds: 200 steps, validation loss 5.79 -> 2.24, in
14 s on an idle 2-core x86_64 KVM (bench/RESULTS.md); train.py's own defaults are the README's 2-3 minute run.

    python train.py config/cpu_tiny.py --nitp_layer=2
"""
out_dir = "out-cpu_tiny"  # its own folder: a run of another preset (or of the defaults) is not replaced
n_layer = 4
n_embd = 64
n_head = 4
block_size = 64
batch_size = 16
max_iters = 200
eval_interval = 50
warmup_iters = 20
