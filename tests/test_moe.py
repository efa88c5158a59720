"""
Tests of the mixture-of-experts layer in model.py: each checks a property that breaks if the code
is wrong (equality with a per-token reference, a closed-form loss, a zero gradient, compiled ==
eager, a two-process run). CPU, tiny shapes.

    python -m pytest -q tests/test_moe.py                 # under a minute on 2 cores

Shape legend as in model.py: T tokens, E routed experts, K experts per token, D width, H expert width.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model
from model import GPT, MoE, GPTConfig, SwiGLU, expert_balance_stats, load_balance_loss

D = 16  # model width of the layer tests; a multiple of 4 so fp32 rows are 16-byte aligned for _grouped_mm


def moe_config(n_experts, top_k, n_shared=1, hidden=12, renorm=False, **overrides):
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=D, n_experts=n_experts,
                moe_top_k=top_k, n_shared_experts=n_shared, expert_hidden=hidden, moe_renorm=renorm)
    return GPTConfig(**{**base, **overrides})


def make_moe(config, idle=(), seed=0):
    """An MoE layer with random weights; experts in `idle` are pushed out of every top-k: inputs
    get a constant feature 0 (see make_inputs) on which their router rows are very negative."""
    torch.manual_seed(seed)
    layer = MoE(config)
    with torch.no_grad():
        for w in layer.parameters():
            w.normal_(0.0, 0.3)  # larger than the 0.02 init, so that routing is far from uniform
        layer.router.weight[list(idle), 0] = -100.0
    return layer


def make_inputs(n_tokens, seed=1):
    torch.manual_seed(seed)
    x = torch.randn(1, n_tokens, D)  # (B, T, D)
    x[..., 0] = 1.0
    return x.requires_grad_()


def reference_moe(layer, x, renorm):
    """The definition, token by token, with each expert's weights sliced out by hand."""
    e = layer.experts
    out = []
    for x_t in x.reshape(-1, D):  # (D,)
        scores = torch.softmax(layer.router.weight.float() @ x_t.float(), dim=-1)  # (E,)
        top = scores.topk(layer.top_k)
        weights = top.values / top.values.sum() if renorm else top.values  # (K,)
        y_t = sum(w * ((F.silu(x_t @ e.c_gate[i]) * (x_t @ e.c_up[i])) @ e.c_proj[i])
                  for w, i in zip(weights, top.indices.tolist()))
        out.append(y_t + layer.shared(x_t) if layer.shared is not None else y_t)
    return torch.stack(out).view_as(x)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=False)


@pytest.fixture(params=["grouped", "loop"])
def path(request, monkeypatch):
    """Run a test through torch._grouped_mm, then through the per-expert loop; count the calls so a
    silent switch of path cannot pass for the other."""
    calls = []
    real = torch._grouped_mm

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    monkeypatch.setattr(model, "GROUPED_MM", request.param == "grouped")
    yield request.param
    assert (len(calls) > 0) == (request.param == "grouped"), f"{request.param} path not taken"


@pytest.mark.parametrize("n_experts,top_k,n_shared,idle", [
    (4, 1, 0, ()), (8, 2, 1, (3, 5)), (16, 4, 2, (0, 1, 2, 7, 15)), (6, 6, 1, ()),
])
@pytest.mark.parametrize("renorm", [False, True])
def test_moe_matches_per_token_reference(path, n_experts, top_k, n_shared, idle, renorm):
    layer = make_moe(moe_config(n_experts, top_k, n_shared=n_shared, renorm=renorm), idle=idle)
    x = make_inputs(24)
    y, (_, counts) = layer(x)
    assert all(counts[i] == 0 for i in idle), "the test meant these experts to get no token"
    y_ref = reference_moe(layer, x, renorm)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)  # a random upstream gradient: every output element matters
    wrt = [x] + list(layer.parameters())
    for got, want in zip(grads((y * g).sum(), wrt), grads((y_ref * g).sum(), wrt)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_idle_expert_gets_an_exact_zero_gradient(path):
    """DDP without find_unused_parameters needs every parameter to get a gradient every step."""
    layer = make_moe(moe_config(8, 2), idle=(2, 6))
    y, (aux, counts) = layer(make_inputs(24))
    (y.square().sum() + aux).backward()
    for w in (layer.experts.c_gate, layer.experts.c_up, layer.experts.c_proj):
        assert w.grad is not None and (w.grad[[2, 6]] == 0).all() and w.grad.abs().sum() > 0


def test_one_expert_top1_without_shared_is_the_dense_mlp(path):
    layer = make_moe(moe_config(1, 1, n_shared=0, hidden=12))
    dense = SwiGLU(D, 12)
    with torch.no_grad():  # nn.Linear stores (out, in); the stacked experts store (in, out)
        dense.c_gate.weight.copy_(layer.experts.c_gate[0].T)
        dense.c_up.weight.copy_(layer.experts.c_up[0].T)
        dense.c_proj.weight.copy_(layer.experts.c_proj[0].T)
    x = make_inputs(10)
    torch.testing.assert_close(layer(x)[0], dense(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n_experts,top_k", [(4, 1), (8, 2), (144, 8)])
def test_balance_loss_closed_forms(n_experts, top_k):
    T = 4 * n_experts
    uniform = torch.full((T, n_experts), 1.0 / n_experts)
    even = torch.full((n_experts,), T * top_k // n_experts)
    assert load_balance_loss(uniform, even, top_k).item() == pytest.approx(1.0)
    # Worst case: the same K experts take every token and hold all the score: f_i = E/K, P_i = 1/K.
    collapsed = torch.zeros(T, n_experts)
    collapsed[:, :top_k] = 1.0 / top_k
    counts = torch.zeros(n_experts, dtype=torch.int64)
    counts[:top_k] = T
    assert load_balance_loss(collapsed, counts, top_k).item() == pytest.approx(n_experts / top_k)
    for seed in range(5):  # and no routing exceeds that maximum
        torch.manual_seed(seed)
        scores = torch.randn(T, n_experts).mul(3).softmax(-1)
        counts = model.expert_counts(scores.topk(top_k).indices, n_experts)
        assert load_balance_loss(scores, counts, top_k).item() <= n_experts / top_k + 1e-5


def test_balance_loss_reaches_the_router_and_the_total():
    cfg = moe_config(8, 2, n_layer=3, moe_aux_weight=0.25)
    torch.manual_seed(0)
    gpt = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    _, losses = gpt(idx, idx)
    expected = losses["ntp"] + cfg.nitp_weight * losses["nitp"] + 0.25 * losses["moe_aux"]
    torch.testing.assert_close(losses["total"], expected)
    losses["moe_aux"].backward()
    for i in (1, 2):  # block 0 is dense (n_dense_layers=1)
        assert gpt.transformer.h[i].mlp.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("n_layer", [3, 5])  # 2 and 4 MoE layers
def test_moe_aux_is_the_mean_of_the_per_layer_balance_losses(n_layer):
    cfg = moe_config(8, 2, n_layer=n_layer)
    torch.manual_seed(0)
    gpt = GPT(cfg)
    per_layer = []  # each MoE layer's own (balance loss, counts), seen from outside
    for block in gpt.transformer.h[1:]:
        block.mlp.register_forward_hook(lambda m, i, o: per_layer.append(o[1][0]))
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    _, losses = gpt(idx, idx)
    assert len(per_layer) == n_layer - 1 and len(set(v.item() for v in per_layer)) > 1
    torch.testing.assert_close(losses["moe_aux"], torch.stack(per_layer).mean())
    with torch.no_grad():  # uniform scores: the balance loss is 1 in every layer, so the mean is 1 too
        for block in gpt.transformer.h[1:]:
            block.mlp.router.weight.zero_()
    assert gpt(idx, idx)[1]["moe_aux"].item() == pytest.approx(1.0, abs=1e-6)


def test_float64_moe_takes_the_loop_and_matches_float32():
    cfg = moe_config(8, 2, n_layer=3)
    torch.manual_seed(0)
    gpt = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    logits32 = gpt(idx)[0]
    logits64, losses = gpt.double()(idx)[0], gpt(idx, idx)[1]  # _grouped_mm has no float64 kernel
    assert logits64.dtype == torch.float64
    torch.testing.assert_close(logits64.float(), logits32, atol=1e-4, rtol=1e-4)
    losses["total"].backward()


def test_expert_counts_in_the_loss_dict():
    cfg = moe_config(8, 2, n_layer=4, n_dense_layers=2)
    gpt = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size))
    _, losses = gpt(idx, idx)
    counts = losses["expert_counts"]
    assert counts.shape == (2, 8) and counts.dtype == torch.int64 and not counts.requires_grad
    assert (counts.sum(dim=1) == 3 * cfg.block_size * 2).all()  # every token reaches K experts
    assert [type(b.mlp).__name__ for b in gpt.transformer.h] == ["SwiGLU", "SwiGLU", "MoE", "MoE"]


def test_expert_balance_stats():
    stats = expert_balance_stats(torch.tensor([[4, 4, 4, 4], [8, 0, 0, 8]]))
    assert stats == dict(imbalance=2.0, idle=2)
    assert expert_balance_stats(torch.tensor([3, 3, 3])) == dict(imbalance=1.0, idle=0)


def test_moe_off_builds_nothing():
    dense = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=D))
    names = [n for n, _ in dense.named_parameters()]
    assert not any("router" in n or "experts" in n or "shared" in n for n in names)
    idx = torch.randint(0, 64, (1, 16))
    assert "moe_aux" not in dense(idx, idx)[1]


def test_init_and_optimizer_groups_cover_stacked_weights():
    cfg = moe_config(8, 2, n_layer=4)
    gpt = GPT(cfg)
    experts = gpt.transformer.h[1].mlp.experts
    assert experts.c_gate.std().item() == pytest.approx(0.02, rel=0.1)
    assert experts.c_proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.1)
    opt = gpt.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in gpt.named_parameters():
        if ".mlp." in name and "experts" in name or "router" in name:
            assert id(p) in decayed, name


@pytest.mark.parametrize("bad,message", [
    (dict(moe_top_k=9), "moe_top_k"), (dict(n_dense_layers=2), "n_dense_layers"),
    (dict(n_shared_experts=-1), "n_shared_experts"), (dict(moe_aux_weight=-0.1), "moe_aux_weight"),
])
def test_config_rejects_bad_moe_fields(bad, message):
    with pytest.raises(ValueError, match=message):
        moe_config(8, 2, **bad)


def test_expert_hidden_default_matches_the_dense_active_width():
    cfg = GPTConfig(n_embd=128, n_head=4, n_experts=16, moe_top_k=4, n_shared_experts=1)
    assert cfg.expert_hidden == 16 * math.ceil(cfg.mlp_hidden / 5 / 16)


def test_router_is_fp32_under_bf16_autocast():
    layer = make_moe(moe_config(8, 2))
    x = make_inputs(24).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _, _ = layer.route(x.view(-1, D))
        y, _ = layer(x)
    assert scores.dtype == torch.float32 and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x)[0], rtol=0.05, atol=0.05)


def compiled_matches_eager(backend):
    cfg = moe_config(8, 2, n_layer=3, nitp_layer=1)
    torch.manual_seed(0)
    gpt = GPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size))
    _, eager = gpt(idx, idx)
    eager_grads = grads(eager["total"], list(gpt.parameters()))
    torch._dynamo.reset()
    _, comp = torch.compile(gpt, backend=backend, fullgraph=True)(idx, idx)  # fullgraph: a break raises
    for key in ("ntp", "nitp", "moe_aux", "total"):
        torch.testing.assert_close(comp[key], eager[key], rtol=1e-5, atol=1e-5)
    assert torch.equal(comp["expert_counts"], eager["expert_counts"])
    for got, want in zip(grads(comp["total"], list(gpt.parameters())), eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compile_fullgraph_matches_eager():
    """aot_eager traces forward and backward as torch.compile does (dynamo, fake tensors through the
    custom expert ops, AOT autograd); only inductor's code generation is left out: it compiles for
    45-85 s on 2 cores, and the dense model's inductor test in test_nitp.py covers that backend."""
    compiled_matches_eager("aot_eager")


def tiny_dataset(path, n_train=4000, n_val=1000):
    """A byte-level dataset in train.py's format: uint16 token ids and meta.json."""
    import json
    import numpy as np
    rng = np.random.default_rng(0)
    path.mkdir()
    rng.integers(0, 256, n_train, dtype=np.uint16).tofile(path / "train.bin")
    rng.integers(0, 256, n_val, dtype=np.uint16).tofile(path / "val.bin")
    meta = dict(tokenizer="byte", vocab_size=257, dtype="uint16", train_tokens=n_train, val_tokens=n_val, eot_token=256)
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("expert_hidden", [16, 10])  # 16: torch._grouped_mm; 10 (40-byte rows): the loop
def test_ddp_two_processes_with_idle_experts(tmp_path, expert_hidden):
    """train.py under torchrun (gloo, CPU) with experts that get no token: each process sees 1 x 8
    tokens with K = 1 of 16 experts, so at least 8 experts per MoE layer are idle in every step.
    DDP without find_unused_parameters fails at the next step if a parameter takes no part in the
    backward; stacked expert weights take part whatever the routing (their idle slices get exact
    zeros, checked in test_idle_expert_gets_an_exact_zero_gradient), on both dispatch paths."""
    import json
    import subprocess
    import sys
    data = tiny_dataset(tmp_path / "data")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(here, "train.py"), os.path.join(here, "config", "moe_tiny_cpu.py"),
           f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--n_layer=3", "--n_embd=32", "--n_head=2",
           "--n_kv_head=1", "--n_experts=16", "--moe_top_k=1", f"--expert_hidden={expert_hidden}",
           "--batch_size=1", "--block_size=8", "--max_iters=4", "--eval_interval=4", "--eval_iters=2",
           "--log_interval=1", "--warmup_iters=1", "--compile=false", "--device=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in steps)
