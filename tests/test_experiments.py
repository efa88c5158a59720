"""
Tests of experiments/: the runner's table and run cache, the probe's retrieval and geometry, and the
GPU script's CPU smoke path. CPU only, tiny models; the scripts run as a user would, under timeouts.

    python -m pytest -q tests/test_experiments.py
"""
import glob
import importlib.util
import json
import os

import numpy as np
import pytest
import torch

import prepare_data
import dataset
from conftest import GPT2_FILE, TINY, make_dataset, needs_gpt2, read_log, run_script
from experiments import gpu_nitp, probe, run_experiments
from model import GPT, GPTConfig
from nitp import effective_rank, mean_pairwise_cosine

EOT = 59  # make_dataset's end-of-text id (vocab 60)


def documents(n_docs, length, rng, repeat_halves=False):
    """A token stream of n_docs documents, each led by EOT as prepare_data.py writes them. With
    repeat_halves every document is a random sequence written twice, so its halves are equal."""
    out = []
    for _ in range(n_docs):
        body = rng.integers(0, EOT, size=length // 2 if repeat_halves else length)
        out += [EOT, *(np.concatenate([body, body]) if repeat_halves else body)]
    return np.array(out, dtype=np.uint16)


@pytest.fixture(scope="module")
def doc_data(tmp_path_factory):
    rng = np.random.default_rng(0)
    return make_dataset(tmp_path_factory.mktemp("docs"), train_ids=documents(300, 60, rng),
                        val_ids=documents(24, 60, rng))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(block_size=32, vocab_size=64, n_layer=3, n_head=2, n_embd=32), **overrides})).eval()


# ------------------------------------------------------------------------------------------------
# the runner

def run_dirs(root, variant, seed):
    return sorted(glob.glob(os.path.join(root, f"{variant}_s{seed}_*")))


@pytest.fixture
def one_thread(monkeypatch):
    """The runner's train.py children single-threaded, as run_script's: two cores, less contention."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_experiment_runner_table_is_mean_and_spread_over_seeds(data_dir, tmp_path, one_thread):
    root = str(tmp_path / "exp")
    assert run_experiments.main(["--variants=ntp,nitp", "--seeds=2", f"--out={root}", "--max_iters=4", "--probe_docs=4",
                                 "--", *TINY, f"--data_dir={data_dir}", "--eval_interval=2"]) == 0
    table = (tmp_path / "exp" / "results.md").read_text().splitlines()
    finals = {v: [read_log(run_dirs(root, v, s)[0])[1][-1] for s in (1, 2)] for v in ("ntp", "nitp")}
    for row, v in zip(table[2:], ("ntp", "nitp")):
        losses = [f["val_loss"] for f in finals[v]]
        assert row.startswith(f"| {v} | 2 | {np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f} |")
    assert table[0].split(" | ")[2:4] == ["val_loss", "val_nitp"]
    assert table[2].split(" | ")[3] == "-" and "-" not in table[3].split(" | ")[3]  # the baseline has no NITP loss
    # the probe's retrieval columns come from the cached probe.json of each run
    assert table[0].endswith("| recall_at_1 | mrr |")
    recalls = [json.load(open(os.path.join(run_dirs(root, "nitp", s)[0], "probe.json")))["retrieval"]["recall_at_1"]
               for s in (1, 2)]
    assert f"| {np.mean(recalls):.4f} ± {np.std(recalls, ddof=1):.4f} |" in table[3]
    # same seed, same data and initial weights: the step-0 evaluation of the trunk is identical
    first = {v: read_log(run_dirs(root, v, 1)[0])[1][0] for v in ("ntp", "nitp")}
    assert first["ntp"]["val_loss"] == pytest.approx(first["nitp"]["val_loss"], rel=1e-6)


def test_runner_reuses_a_run_only_for_the_same_arguments(data_dir, tmp_path, monkeypatch, one_thread):
    started = []
    real = run_experiments.run_one
    monkeypatch.setattr(run_experiments, "run_one", lambda out_dir, *a: started.append(out_dir) or real(out_dir, *a))
    root = str(tmp_path / "exp")
    base = ["--variants=ntp", "--seeds=1", f"--out={root}", "--probe_docs=0", "--"]
    common = [*TINY, f"--data_dir={data_dir}", "--eval_interval=2"]
    run_experiments.main([*base, *common, "--max_iters=3"])  # the documented form: max_iters after --
    run_experiments.main([*base, *common, "--max_iters=3"])  # same arguments: finished, reused
    assert len(started) == 1 and len(run_dirs(root, "ntp", 1)) == 1
    run_experiments.main([*base, *common, "--max_iters=3", "--learning_rate=1e-3"])  # changed: a new run
    run_experiments.main([*base, *common, "--max_iters=4"])
    assert len(started) == 3 and len(set(started)) == 3 and len(run_dirs(root, "ntp", 1)) == 3
    assert [r["iter"] for r in read_log(started[-1])[1]][-1] == 4  # the run's own max_iters, not the runner's


def test_runner_records_a_diverged_run_and_goes_on(data_dir, tmp_path, monkeypatch, one_thread):
    real, started = run_experiments.run_one, []

    def run_one(out_dir, args, *rest):  # mse "diverges": train.py's exit code for a non-finite loss
        started.append(out_dir)
        return 3 if "--nitp_loss=mse" in args else real(out_dir, args, *rest)
    monkeypatch.setattr(run_experiments, "run_one", run_one)
    argv = ["--variants=mse,ntp", "--seeds=1", f"--out={tmp_path}", "--probe_docs=0", "--", *TINY,
            f"--data_dir={data_dir}", "--max_iters=2", "--eval_interval=2"]
    assert run_experiments.main(argv) == 0 and len(started) == 2
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| mse | 0 (+1 diverged) | - |") and table[3].startswith("| ntp | 1 |")
    assert run_experiments.main(argv) == 0 and len(started) == 2  # a diverged run is not repeated


def test_runner_variants_resolve_to_train_arguments(capsys, tmp_path):
    extra = ["--n_layer=10", "--n_head=2", "--n_embd=32"]
    layers = {v: run_experiments.run_args(v, 1, 0, extra)[2].get("nitp_layer") for v in ("nitp", "layer50", "layer80")}
    assert layers == {"nitp": None, "layer50": 5, "layer80": 8}  # nitp: the default, round(0.2 * n_layer) = 2
    assert GPTConfig(n_layer=10, n_head=2, n_embd=32).nitp_layer == 2
    hashes = set()
    for v in run_experiments.VARIANTS:  # every variant is accepted by train.py, and each is a distinct run
        argv, cfg, model_args = run_experiments.run_args(v, 1, 0, extra)
        assert argv[-1].startswith("--nitp_layer=") or argv[-1] == "--seed=1"
        hashes.add(run_experiments.settings_hash(cfg, model_args))
    assert len(hashes) == len(run_experiments.VARIANTS)
    _, cfg, model_args = run_experiments.run_args("ntp", 1, 0, extra + ["--nitp_weight=0.5"])
    assert model_args["nitp_weight"] == 0  # the variant's own setting wins over the common ones
    for bad in (["--variants=ntp,bogus"], ["--seeds=0"], ["--", "--n_layer=two"]):  # refused before any run
        assert run_experiments.main([f"--out={tmp_path}", *bad]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1 and not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------------------
# the probe: retrieval, geometry, the command

def test_split_documents_at_end_of_text():
    docs = probe.split_documents(np.array([5, 6, EOT, 1, 2, EOT, EOT, 3]), EOT)
    assert [d.tolist() for d in docs] == [[5, 6], [1, 2], [3]]
    firsts, seconds = probe.document_halves([np.arange(10), np.arange(3), np.arange(7)], block_size=2, n_docs=5,
                                            min_half=2)
    assert [f.tolist() for f in firsts] == [[0, 1], [0, 1]] and [s.tolist() for s in seconds] == [[5, 6], [3, 4]]


def test_retrieval_recall_is_one_when_both_halves_are_the_same_text():
    rng = np.random.default_rng(1)
    firsts, seconds = probe.document_halves(probe.split_documents(documents(16, 40, rng, repeat_halves=True), EOT),
                                            block_size=32, n_docs=16)
    assert len(firsts) == 16 and all(np.array_equal(f, s) for f, s in zip(firsts, seconds))
    model = tiny_model()
    scores = probe.retrieval_scores(probe.embed(model, firsts, "cpu", batch_size=5),
                                    probe.embed(model, seconds, "cpu", batch_size=16))
    assert scores == {"recall_at_1": 1.0, "mrr": 1.0}


def test_retrieval_of_random_states_is_chance():
    n = 32
    runs = [probe.retrieval_scores(torch.randn(n, 16, generator=torch.Generator().manual_seed(s)),
                                   torch.randn(n, 16, generator=torch.Generator().manual_seed(1000 + s)))
            for s in range(40)]
    chance = probe.chance_scores(n)
    assert chance["mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)
    assert np.mean([r["recall_at_1"] for r in runs]) < 3 / n
    # 1/rank of a uniform rank has std ~0.19 at n=32; over 1280 queries the mean is within ~0.005
    assert np.mean([r["mrr"] for r in runs]) == pytest.approx(chance["mrr"], abs=0.02)
    # states collapsed to one point tie everywhere: exactly chance, not a perfect score
    same = torch.ones(n, 16)
    assert probe.retrieval_scores(same, same) == pytest.approx(chance)


def test_layer_geometry_matches_states_computed_independently():
    model = tiny_model(n_layer=3, nitp_layer=1)
    idx = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the trunk written out by hand
        x = model.transformer.wte(idx)
        expected = [x]
        for block in model.transformer.h:
            out = block(x, model.rope_cos[:32], model.rope_sin[:32])
            x = out[0] if isinstance(out, tuple) else out  # (x, MoE stats) in newer model.py
            expected.append(x)
        expected.append(model.transformer.ln_f(x))
    states = probe.layer_states(model, idx)
    assert len(states) == 3 + 2
    for got, want in zip(probe.geometry_by_layer(states), expected):
        flat = want.reshape(-1, 32)
        assert got["erank"] == pytest.approx(effective_rank(flat), rel=1e-5)
        assert got["mean_cos"] == pytest.approx(mean_pairwise_cosine(flat), abs=1e-6)
    with torch.no_grad():
        z, h, _ = model.trunk(idx)
        cos = torch.nn.functional.cosine_similarity(model.nitp_head(h)[:, :-1], z[:, 1:], dim=-1).mean().item()
    assert probe.nitp_cosine(model, idx) == pytest.approx(cos, abs=1e-6)
    assert probe.nitp_cosine(tiny_model(nitp_weight=0), idx) is None


@pytest.fixture(scope="module")
def trained_run(doc_data, tmp_path_factory):
    """A checkpoint that train.py wrote after 4 steps of a tiny model (2 blocks, context 32)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    done = run_script("train.py", *TINY, "--block_size=32", f"--data_dir={doc_data}", f"--out_dir={out}",
                      "--max_iters=4", "--eval_interval=4", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def test_probe_command_on_a_trained_checkpoint(trained_run, doc_data, tmp_path):
    res = run_script("-m", "experiments.probe", trained_run, f"--out={tmp_path / 'probe'}", "--docs=16",
                     "--tokens=256", timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert "proxy" in result["note"] and "MTEB" in result["note"]
    (run,) = result["runs"]
    assert run["iter"] == 4 and run["data_dir"] == doc_data
    assert [layer["layer"] for layer in run["layers"]] == [0, 1, 2, "final"]  # TINY: 2 blocks
    assert run["retrieval"]["n_docs"] == 16 and 0 <= run["retrieval"]["recall_at_1"] <= 1
    assert -1 <= run["nitp_cos"] <= 1
    rows = (tmp_path / "probe" / "probe.md").read_text().splitlines()
    assert rows[2].startswith("| run | 4 | 1 | 1 |")


@pytest.mark.parametrize("args, needle", [
    (["{tmp}/nowhere"], "no checkpoint at"),
    (["{run}", "--data_dir={tmp}/nodata"], "no dataset in"),
    (["{run}", "--data_dir={nodocs}"], "document(s) of at least"),
])
def test_probe_bad_inputs_are_one_line_and_exit_2(trained_run, tmp_path, args, needle):
    nodocs = make_dataset(tmp_path / "nodocs", train_ids=np.zeros(500), val_ids=np.arange(300) % 50)  # no EOT
    args = [a.format(tmp=tmp_path, run=trained_run, nodocs=nodocs) for a in args]
    res = run_script("-m", "experiments.probe", *args, f"--out={tmp_path / 'probe'}", timeout=120)
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (tmp_path / "probe").exists()


# ------------------------------------------------------------------------------------------------
# the GPU script: its corpus, its verdict, and its CPU smoke path end to end

@pytest.mark.parametrize("tokenizer", ["byte", pytest.param("gpt2", marks=needs_gpt2)])
def test_gpu_corpus_is_this_pythons_sources_in_prepare_data_format(tmp_path, tokenizer):
    tiktoken_file = str(GPT2_FILE) if tokenizer == "gpt2" else None
    folder, meta = gpu_nitp.build_corpus(str(tmp_path), tokenizer, tiktoken_file, 300_000, num_proc=2, val_every=5)
    _, files = gpu_nitp.python_sources(300_000)
    assert sum(size for _, size in files) >= 300_000 and meta["input_bytes"] == sum(size for _, size in files)
    assert meta["val_documents"] == len(files[::5]) and meta["train_documents"] == len(files) - len(files[::5])
    tok = prepare_data.get_tokenizer(tokenizer, tiktoken_file)
    val = dataset.load_split(folder, "val", dataset.read_meta(folder))  # train.py reads it
    docs = probe.split_documents(val, meta["eot_token"])
    assert val[0] == meta["eot_token"] and len(docs) == meta["val_documents"]
    with open(files[0][0], "rb") as f:
        assert tok.decode(docs[0]) == f.read().decode("utf-8", errors="replace")  # the first val file, whole
    if tokenizer == "byte":
        os.remove(os.path.join(folder, "train.bin"))  # the same recipe is reused, not rebuilt
        assert gpu_nitp.build_corpus(str(tmp_path), tokenizer, None, 300_000, 2, val_every=5) == (folder, meta)


def test_gpu_verdict_reads_the_second_half_of_the_run():
    evals = [{"iter": i, "erank": e, "mean_cos": c} for i, e, c in
             [(0, 60, 0.05), (100, 40, 0.10), (200, 42, 0.12), (300, 39, 0.15), (400, 38, 0.18)]]
    r = gpu_nitp.regime(evals)
    assert (r["from_iter"], r["to_iter"]) == (200, 400) and r["reached"]
    assert r["erank_change"] == pytest.approx(38 / 42 - 1) and r["cos_change"] == pytest.approx(0.06)
    flat = [{**e, "erank": 40.0} for e in evals]
    assert not gpu_nitp.regime(flat)["reached"] and gpu_nitp.regime(evals[:2]) is None


def test_gpu_script_smoke_path(tmp_path):
    out = tmp_path / "gpu"
    res = run_script("-m", "experiments.gpu_nitp", "--smoke", f"--out={out}", timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    log = json.loads((out / "gpu_nitp.json").read_text())
    assert list(log["runs"]) == ["ntp", "nitp"] and log["corpus"]["tokenizer"] == "byte"
    for run in log["runs"].values():
        assert sorted(run["evals"], key=int) == ["0", "3", "6"]
        assert {"recall_at_1", "mrr", "erank_by_layer"} <= set(run["evals"]["0"]) & set(run["evals"]["6"])
    ntp, nitp = (log["runs"][k]["evals"]["0"] for k in ("ntp", "nitp"))
    # same seed: the same initial trunk, so step 0 is identical, as evaluated by train.py and as probed here
    assert ntp["val_loss"] == nitp["val_loss"] and ntp["erank_by_layer"] == nitp["erank_by_layer"]
    assert ntp["recall_at_1"] == nitp["recall_at_1"] and nitp["nitp_cos"] is not None and ntp["nitp_cos"] is None
    assert "| ntp | 6 |" in res.stdout and "| nitp | 6 |" in res.stdout and "paper's regime" in res.stdout
    assert (out / "gpu_nitp.md").exists()
    assert (out / "gpu_nitp.png").exists() or importlib.util.find_spec("matplotlib") is None


@pytest.mark.parametrize("args, needle", [([], "--tiktoken_file"), (["--smoke", "--tiktoken_file={bad}"], "gpt2")])
def test_gpu_script_bad_inputs_are_one_line_and_exit_2(tmp_path, args, needle):
    (tmp_path / "bad.tiktoken").write_text("not ranks\n")
    args = [a.format(bad=tmp_path / "bad.tiktoken") for a in args]
    res = run_script("-m", "experiments.gpu_nitp", *args, f"--out={tmp_path / 'gpu'}", timeout=60)
    assert res.returncode == 2 and needle in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
