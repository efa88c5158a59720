"""
The CPU benchmarks stay runnable: a tiny run of each prints its ratios, and bad options get one
line and exit code 2 (bench/gpu.py and bench/prepare_data.py have tests of their own).

    python -m pytest -q tests/test_bench.py
"""
import re

import pytest

from conftest import run_script


def test_overhead_bench_runs_and_reports_the_analytic_share():
    out = run_script("-m", "bench.overhead", "--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=16",
                     "--batch_size=2", "--vocab_size=64", "--warmup=1", "--rounds=3", timeout=240)
    assert out.returncode == 0, out.stderr
    # the analytic share printed is flops_per_token's: head 72 d^2 + 18 d against the trunk
    from model import GPTConfig, flops_per_token
    share = flops_per_token(GPTConfig(n_layer=2, n_embd=32, n_head=2, block_size=16, vocab_size=64))["nitp_share"]
    assert f"NITP extra FLOPs (analytic, 6 x params touched): {100 * share:+.2f}%" in out.stdout
    assert re.search(r"NITP extra time \(measured.*\): [+-]\d+\.\d\d%", out.stdout)


def test_moe_bench_runs_one_point():
    out = run_script("-m", "bench.moe", "--tokens=64", "--width=16", "--expert_hidden=8", "--points=4x2",
                     "--reps=1", "--warmup=0", timeout=240)
    assert out.returncode == 0, out.stderr
    assert re.search(r"^\s+4\s+2\s+\d", out.stdout, re.M)


@pytest.mark.parametrize("module, args", [
    ("bench.overhead", ["--rounds=1"]), ("bench.overhead", ["--device=banana"]), ("bench.overhead", ["--n_head=3"]),
    ("bench.moe", ["--points=3x4"]), ("bench.moe", ["--points=ab"]), ("bench.moe", ["--tokens=0"]),
])
def test_bad_bench_options_are_one_line_exit_2(module, args):
    out = run_script("-m", module, *args, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
