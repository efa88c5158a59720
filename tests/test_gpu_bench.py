"""
Tests that keep the GPU session's script and preset from rotting while no GPU is at hand: the
CPU smoke path of bench/gpu.py (every section, tiny shapes), and config/gpt2_124m.py read the way
train.py reads it.

    python -m pytest -q tests/test_gpu_bench.py      # ~30 s on 2 cores
"""
import ast
import json

import pytest

import train
from conftest import ROOT, run_script
from model import GPTConfig

SECTIONS = ("env", "dense", "moe_layer", "moe_compile", "e2e", "memory")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke run's report, and its stderr for failure messages."""
    out = tmp_path_factory.mktemp("bench") / "gpu.json"
    proc = run_script("-m", "bench.gpu", "--device=cpu", "--smoke", f"--out={out}", timeout=240)
    assert out.is_file(), f"bench.gpu wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text()), proc


def test_smoke_runs_every_section_without_failure(smoke):
    report, proc = smoke
    assert list(report["sections"]) == list(SECTIONS)
    failed = {name: e.get("error") or e.get("reason") or e["status"]
              for name, e in report["sections"].items() if e["status"] != "ok"}
    assert not failed, f"sections not ok: {failed}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "| section | figure | value |" in proc.stdout  # the markdown table


def test_smoke_figures(smoke):
    sections = smoke[0]["sections"]
    dense = sections["dense"]
    assert dense["ntp"]["tokens_per_s"] > 0 and dense["nitp"]["tokens_per_s"] > 0
    assert 0 < dense["nitp_overhead_analytic"] < 1
    for point in sections["moe_layer"]["points"]:  # the grouped and loop paths are one layer
        assert max(point["max_rel_diff"].values()) < 1e-4
        assert point["idle_expert_tokens"] == 0 and max(point["idle_expert_grad_max"].values()) == 0


def test_smoke_training_sections_learn_and_resume(smoke):
    sections = smoke[0]["sections"]
    losses = sections["moe_compile"]["losses"]
    assert sections["moe_compile"]["graph_breaks"] in (0, None) and losses[-1] < losses[0]
    e2e = sections["e2e"]
    first, resumed = e2e["first_train"], e2e["resume_train"]
    assert first[-1][1] < first[0][1] and e2e["first_val"][-1][1] < e2e["first_val"][0][1]
    # The resumed run picks up at the checkpoint's step and runs to the new max_iters.
    ckpt_step, new_max = e2e["max_iters"]
    assert e2e["first_ckpt_iter"] == ckpt_step and e2e["resume_ckpt_iter"] == new_max
    assert e2e["resumed_from_iter"] == ckpt_step and resumed[-1][0] == new_max
    assert all(step > ckpt_step for step, _ in resumed)


def test_gpt2_124m_preset():
    path = ROOT / "config" / "gpt2_124m.py"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert "torchrun --standalone --nproc_per_node=8 train.py config/gpt2_124m.py" in doc
    cfg, model_args = train.parse_args([str(path)])
    mcfg = GPTConfig(vocab_size=50304, **model_args)  # llm.c shards: GPT-2's 50257 ids, padded to 64
    assert (mcfg.n_layer, mcfg.n_embd, mcfg.n_head, mcfg.block_size) == (12, 768, 12, 1024)
    assert (mcfg.nitp_layer, mcfg.nitp_weight) == (2, 1.0)
    assert cfg.train_shards.endswith(".bin") and "*" in cfg.train_shards and "*" in cfg.val_shards
    assert cfg.compile and cfg.dtype == "bfloat16"
    assert (cfg.learning_rate, cfg.min_lr) == (6e-4, 6e-5) and 500 <= cfg.warmup_iters <= 1000
    # Tokens per optimizer step on 8 processes, derived as train.py does (TrainConfig's comments).
    world = 8
    per_micro = cfg.batch_size * mcfg.block_size * world
    if cfg.total_batch_size:
        assert cfg.total_batch_size % per_micro == 0
        accum = cfg.total_batch_size // per_micro
    else:
        accum = cfg.gradient_accumulation_steps
    assert per_micro * accum == 524_288
    assert abs(cfg.max_iters * 524_288 / 10e9 - 1) < 0.02  # ~10B tokens, FineWeb10B once
