"""
Tests of what issue 22 changed for memory: the chunked cross-entropy (no full logits in training), activation
checkpointing, and the FSDP2 path (fp32 RoPE tables in blocks, sharded gradients during accumulation, memory-mapped
resume, meta-device construction with the non-FSDP weights), router precision, MFU by dtype, bench.memory.

    python -m pytest -q tests/test_memory.py
"""
import json

import pytest
import torch
import torch.nn.functional as F

import model as model_py
import train
from conftest import ROOT, TINY, read_log, run_script, torchrun
from model import GPT, GPTConfig, linear_cross_entropy, load_checkpoint, peak_flops_for, router_logits


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ------------------------------------------------------------------------------------------------
# the loss without full logits

@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])  # one row, a chunk not dividing N, N itself, more than N
def test_chunked_cross_entropy_equals_plain_in_value_and_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(64, 24, requires_grad=True)  # (N, C)
    w = torch.randn(300, 24, requires_grad=True)  # (V, C)
    targets = torch.randint(0, 300, (64,))
    targets[::5] = -1  # ignored positions take no part in the mean or the gradients
    loss = linear_cross_entropy(h, w, targets, chunk)
    gh, gw = torch.autograd.grad(3 * loss, (h, w))  # a non-unit upstream gradient must scale both
    ref = F.cross_entropy(F.linear(h, w).float(), targets, ignore_index=-1)
    rh, rw = torch.autograd.grad(3 * ref, (h, w))
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-6
    assert rel_err(gh, rh) < 1e-6 and rel_err(gw, rw) < 1e-6
    assert gh[::5].abs().max() == 0  # an ignored position's state gets no gradient
    with torch.no_grad():  # evaluation: no gradients made, the same value
        assert abs(linear_cross_entropy(h, w, targets, chunk).item() - ref.item()) / ref.item() < 1e-6


def tiny_config(**kw):
    return GPTConfig(**{"vocab_size": 200, "n_layer": 3, "n_head": 2, "n_embd": 32, "block_size": 16, **kw})


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_and_gradients_equal_the_plain_cross_entropy_of_its_logits(tie, monkeypatch):
    monkeypatch.setattr(model_py, "CE_CHUNK_LOGITS", 200 * 5)  # chunks of 5 positions
    torch.manual_seed(0)
    gpt = GPT(tiny_config(tie_embeddings=tie))
    idx, targets = torch.randint(0, 200, (3, 16)), torch.randint(0, 200, (3, 16))
    targets[:, -2:] = -1
    logits, losses = gpt(idx, targets)
    assert logits is None  # the full logits are never made when there are targets
    grads = torch.autograd.grad(losses["ntp"], list(gpt.parameters()), allow_unused=True)
    ref = F.cross_entropy(gpt(idx)[0].float().view(-1, 200), targets.view(-1), ignore_index=-1)
    refs = torch.autograd.grad(ref, list(gpt.parameters()), allow_unused=True)
    assert abs(losses["ntp"].item() - ref.item()) / ref.item() < 1e-6
    for (name, _), g, r in zip(gpt.named_parameters(), grads, refs):
        if r is not None:  # the NITP head takes no part in the cross-entropy
            assert rel_err(g, r) < 1e-6, name


def test_chunked_cross_entropy_under_bf16_autocast_matches_the_plain_path():
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    targets = torch.randint(0, 100, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, w, targets, 8)
        ref = F.cross_entropy(F.linear(h, w).float(), targets)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert loss.dtype == torch.float32 and gw.dtype == torch.float32  # the weight's gradient in its own dtype
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-3  # both from the same bf16 logits
    assert rel_err(gh, rh) < 2e-2 and rel_err(gw, rw) < 2e-2  # bf16 matmuls, summed in another order


# ------------------------------------------------------------------------------------------------
# activation checkpointing

@pytest.mark.parametrize("kw", [{}, {"dropout": 0.2}, {"n_experts": 4, "moe_top_k": 2, "expert_hidden": 16}])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(kw):
    torch.manual_seed(0)
    gpt = GPT(tiny_config(**kw))
    idx = torch.randint(0, 200, (2, 16))

    def step(checkpoint):
        calls = []
        hook = gpt.transformer.h[1].attn.register_forward_hook(lambda *_: calls.append(1))
        for block in gpt.transformer.h:
            block.checkpoint = checkpoint
        torch.manual_seed(1)  # the same dropout masks; checkpointing must replay them in the recomputation
        _, losses = gpt(idx, idx)
        grads = torch.autograd.grad(losses["total"], list(gpt.parameters()))
        hook.remove()
        return losses, grads, len(calls)

    (plain, plain_grads, plain_calls), (ckpt, ckpt_grads, ckpt_calls) = step(False), step(True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block really ran again in backward
    assert all(torch.equal(plain[k], ckpt[k]) for k in plain)
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, ckpt_grads))


def test_compiled_model_with_checkpointing_and_the_chunked_loss_equals_eager():
    """aot_eager traces forward and backward as torch.compile does (inductor's code generation aside), with
    fullgraph=True: the chunked loss and the checkpointed blocks compile without a graph break."""
    torch.manual_seed(0)
    gpt = GPT(tiny_config())
    idx = torch.randint(0, 200, (2, 16))
    _, eager = gpt(idx, idx)
    eager_grads = torch.autograd.grad(eager["total"], list(gpt.parameters()))
    for block in gpt.transformer.h:
        block.checkpoint = True
    torch._dynamo.reset()
    _, comp = torch.compile(gpt, backend="aot_eager", fullgraph=True)(idx, idx)
    assert all(torch.allclose(comp[k], eager[k], rtol=1e-6, atol=0) for k in eager)
    for got, want in zip(torch.autograd.grad(comp["total"], list(gpt.parameters())), eager_grads):
        assert rel_err(got, want) < 1e-5


def test_training_with_activation_checkpointing_logs_the_same_run(tmp_path):
    from conftest import make_dataset
    data = make_dataset(tmp_path / "data")
    common = [*TINY, f"--data_dir={data}", "--max_iters=3", "--eval_interval=3", "--dropout=0.1"]
    assert train.main([*common, f"--out_dir={tmp_path / 'plain'}"]) == 0
    assert train.main([*common, f"--out_dir={tmp_path / 'ckpt'}", "--activation_checkpointing=true"]) == 0
    a, b = read_log(tmp_path / "plain"), read_log(tmp_path / "ckpt")
    drop = ("ms", "tok_s", "mfu")  # timings differ
    assert [{k: v for k, v in r.items() if k not in drop} for r in sum(a, [])] == \
        [{k: v for k, v in r.items() if k not in drop} for r in sum(b, [])]


# ------------------------------------------------------------------------------------------------
# FSDP2 (torchrun, 2 CPU processes on gloo)

FSDP_WORKER = """
import json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {root!r})
import train
from model import GPT, GPTConfig
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
dist.init_process_group("gloo")
rank = dist.get_rank()
report = {{}}
for tie in (False, True):
    cfg = GPTConfig(vocab_size=96, n_layer=3, n_head=2, n_embd=32, block_size=16, tie_embeddings=tie)
    torch.manual_seed(5)
    full = GPT(cfg).state_dict() if rank == 0 else {{}}  # what train.py does on rank 0
    sharded = train.sharded_model(cfg, full, torch.bfloat16, False, False, torch.device("cpu"))
    # (d) built on the meta device, then given exactly the weights the non-FSDP path makes for the seed
    torch.manual_seed(5)
    plain = GPT(cfg).state_dict()
    got = get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True))  # on every rank
    report[f"equal_init_tie{{tie}}"] = got.keys() == plain.keys() and all(torch.equal(got[k], plain[k]) for k in got)
    report[f"rope_tie{{tie}}"] = torch.equal(sharded.rope_cos, GPT(cfg).rope_cos)
    # (a) with a bf16 parameter policy, the blocks still rotate with fp32 tables
    seen = []
    hook = sharded.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.append(str(args[1].dtype)))
    idx = torch.randint(0, 96, (2, 16))
    sharded(idx, idx)[1]["total"].backward()
    hook.remove()
    report[f"cos_dtype_tie{{tie}}"] = seen
with open(os.path.join({out!r}, "report%d.json" % rank), "w") as f:
    json.dump(report, f)
dist.destroy_process_group()
"""


def test_fsdp_builds_on_meta_with_the_plain_weights_and_gives_blocks_fp32_rope(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER.format(root=str(ROOT), out=str(tmp_path)))
    out = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        for tie in (False, True):
            assert report[f"equal_init_tie{tie}"] and report[f"rope_tie{tie}"], (rank, tie)
            assert report[f"cos_dtype_tie{tie}"] == ["torch.float32"], (rank, tie)


SYNC_RECORDER = """
import json, os, sys
sys.path.insert(0, {root!r})
from torch.distributed.fsdp import FSDPModule
import train
calls = []
original = FSDPModule.set_requires_gradient_sync
def recording(self, requires_gradient_sync, *args, **kw):
    calls.append(requires_gradient_sync)
    return original(self, requires_gradient_sync, *args, **kw)
FSDPModule.set_requires_gradient_sync = recording
code = train.main(sys.argv[1:])
with open(os.path.join({out!r}, "calls%s.json" % os.environ["RANK"]), "w") as f:
    json.dump(calls, f)
sys.exit(code)
"""


def test_fsdp_accumulation_never_holds_unsharded_gradients(tmp_path):
    """Turning the gradient sync off for a micro-step makes FSDP2 keep that step's unsharded gradients
    (pytorch#126166); train.py must never do it."""
    from conftest import make_dataset
    data = make_dataset(tmp_path / "data")
    script = tmp_path / "record.py"
    script.write_text(SYNC_RECORDER.format(root=str(ROOT), out=str(tmp_path)))
    out = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *TINY,
                     f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--max_iters=2", "--fsdp=true",
                     "--gradient_accumulation_steps=3", timeout=180)
    assert out.returncode == 0, out.stderr[-4000:]
    for rank in (0, 1):
        assert False not in json.loads((tmp_path / f"calls{rank}.json").read_text())


def test_fsdp_with_activation_checkpointing_and_resume_equals_fsdp_without(tmp_path):
    from conftest import make_dataset
    data = make_dataset(tmp_path / "data")
    common = [f"--data_dir={data}", "--eval_interval=3", "--gradient_accumulation_steps=2", "--lr_decay_iters=6",
              "--fsdp=true", "--dropout=0.1"]
    torchrun(*common, f"--out_dir={tmp_path / 'plain'}", "--max_iters=6")
    torchrun(*common, f"--out_dir={tmp_path / 'ckpt'}", "--max_iters=3", "--activation_checkpointing=true")
    torchrun(*common, f"--out_dir={tmp_path / 'ckpt'}", "--max_iters=6", "--activation_checkpointing=true",
             "--init_from=resume")  # rank 0 reads the checkpoint and broadcasts it
    drop = ("ms", "tok_s", "mfu")
    a, b = read_log(tmp_path / "plain"), read_log(tmp_path / "ckpt")
    assert [len(r) for r in a] == [len(r) for r in b]
    for x, y in zip(sum(a, []), sum(b, [])):
        assert all(x[k] == pytest.approx(y[k], rel=1e-6, abs=1e-7) for k in x if k not in drop), (x, y)


def test_ddp_with_activation_checkpointing_logs_the_same_run(tmp_path):
    from conftest import make_dataset
    data = make_dataset(tmp_path / "data")
    common = [f"--data_dir={data}", "--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=2",
              "--dropout=0.1"]
    torchrun(*common, f"--out_dir={tmp_path / 'plain'}")
    torchrun(*common, f"--out_dir={tmp_path / 'ckpt'}", "--activation_checkpointing=true")
    drop = ("ms", "tok_s", "mfu")
    assert [{k: v for k, v in r.items() if k not in drop} for r in sum(read_log(tmp_path / "plain"), [])] == \
        [{k: v for k, v in r.items() if k not in drop} for r in sum(read_log(tmp_path / "ckpt"), [])]


def test_checkpoints_load_memory_mapped(tmp_path):
    """Every rank reads the checkpoint on resume: mapped, the ranks of a node share its pages in the page cache."""
    path = str(tmp_path / "ckpt.pt")
    model_py.save_checkpoint(path, {"model": {"w": torch.arange(6.0)}, "model_config": {}})
    w = load_checkpoint(path)["model"]["w"]
    with open("/proc/self/maps") as f:  # Linux: "start-end perms offset dev inode path" per mapping
        spans = [[int(a, 16) for a in line.split()[0].split("-")] for line in f if line.rstrip().endswith(path)]
    assert torch.equal(w, torch.arange(6.0)) and any(lo <= w.data_ptr() < hi for lo, hi in spans)


# ------------------------------------------------------------------------------------------------
# precision of the router, MFU by dtype

@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA only")
def test_router_logits_are_true_fp32_with_tf32_on():
    torch.manual_seed(0)
    x, w = torch.randn(512, 256, device="cuda"), torch.randn(64, 256, device="cuda")
    torch.set_float32_matmul_precision("high")  # what train.py sets on CUDA: TF32 for fp32 matmuls
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = router_logits(x.bfloat16().float(), w)
        tf32 = F.linear(x.bfloat16().float(), w)
    finally:
        torch.set_float32_matmul_precision("highest")
    want = F.linear(x.bfloat16().double(), w.double()).float()
    assert torch.equal(got, want)  # correctly rounded fp32
    assert not torch.equal(tf32, want)  # what the router computed before (shows TF32 is really on)


def test_router_logits_ignore_autocast():
    x, w = torch.randn(5, 8), torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = router_logits(x.bfloat16(), w)
    assert got.dtype == torch.float32 and torch.equal(got, F.linear(x.bfloat16().float(), w))


def test_mfu_peak_depends_on_the_dtype():
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "float16") == 989e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3", "float32") is None  # a bf16 peak would understate fp32 MFU
    assert peak_flops_for("Some Unknown GPU", "bfloat16") is None


# ------------------------------------------------------------------------------------------------
# bench.memory (its measurements run in bench/gpu.py's CPU smoke path, tests/test_gpu_bench.py)

@pytest.mark.parametrize("args", [["--shapes=gpt3"], ["--steps=0"], ["--device=banana"]])
def test_bad_memory_bench_options_are_one_line_exit_2(args):
    out = run_script("-m", "bench.memory", *args, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr


def test_paired_step_ratio_is_the_median_of_its_rounds_and_restores_the_loss():
    import model
    from bench.memory import paired_step_ratio
    chunked = model.linear_cross_entropy
    r = paired_step_ratio("tiny", 2, 16, 3, "cpu")
    assert model.linear_cross_entropy is chunked  # the plain loss never leaks into later training in the process
    assert len(r["plain_s"]) == len(r["chunked_s"]) == 3
    assert r["ratio"] == sorted(c / p for p, c in zip(r["plain_s"], r["chunked_s"]))[1]
