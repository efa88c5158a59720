"""
Tests of tasks.py (downstream scoring), its use in train.py and experiments/evaluate.py: scores by hand on a model
with known log-probabilities, the lm-evaluation-harness tokenisation rule, log-likelihoods against transformers on the
Hugging Face export, 2 DDP ranks against 1 process, few-shot prompts, each reader, bad input. CPU, tiny shapes.

    python -m pytest -q tests/test_tasks.py
"""
import json
import math
import os
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from conftest import GPT2_FILE, ROOT, TINY, make_dataset, needs_gpt2, read_log, run_script
from model import GPT, GPTConfig
from prepare_data import get_tokenizer
from tasks import (PUBLIC, Task, TaskError, arc_item, continuation_logprobs, copa_item, encode_pair, hellaswag_item,
                   lambada_item, load_tasks, own_task, piqa_item, read_text_task, score_tasks, with_shots)

CPU = torch.device("cpu")


class FixedModel(torch.nn.Module):
    """Every position predicts the same distribution `probs`, whatever the context: log-likelihoods by hand."""

    def __init__(self, probs, block_size=16):
        super().__init__()
        self.config = GPTConfig(block_size=block_size, vocab_size=len(probs), n_layer=1, n_head=1, n_embd=8)
        self.logp = torch.tensor(probs, dtype=torch.float64).log().float()

    def forward(self, idx):
        return self.logp.expand(*idx.shape, -1), None  # (B, T, V)


def test_multiple_choice_and_cloze_scores_by_hand():
    model = FixedModel([0.05, 0.5, 0.3, 0.15])  # log-probabilities of ids 0..3 at every position
    lp = np.log([0.05, 0.5, 0.3, 0.15])
    items = [
        # acc: id 1 (-0.69) beats 2, 2 (-2.41); per byte 2, 2 over 10 bytes (-0.24) beats 1 over 1 byte: acc_norm
        # picks choice 1, the answer. So acc 0, acc_norm 1.
        ([3], [[1], [2, 2]], 1, [1, 10]),
        ([3], [[2], [2]], 0, [1, 1]),  # a tie goes to the first choice: right, for both scores
        ([3], [[2], [2]], 1, [1, 1]),  # the same tie, answer second: wrong for both
        ([3], [[0], [1], [2]], 1, [1, 1, 1]),  # plain: right for both
    ]
    s = score_tasks(model, [Task("mc", "choice", items, 0.5)], 3, nullcontext(), CPU)["mc"]
    assert (s["acc"], s["acc_norm"], s["n"]) == (0.5, 0.75, 4)
    assert s["centered"] == pytest.approx((0.5 - 0.5) / 0.5)
    assert s["loglik"] == pytest.approx((2 * lp[2] + lp[2] + lp[2] + lp[1]) / 4, abs=1e-5)
    # cloze: id 1 is the most likely token everywhere, so [1, 1] is the greedy continuation and [1, 2] is not
    cloze = [([3], [[1, 1]], 0, [2]), ([3], [[1, 2]], 0, [2])]
    c = score_tasks(model, [Task("cl", "cloze", cloze, 0.0)], 3, nullcontext(), CPU)["cl"]
    assert (c["acc"], c["centered"]) == (0.5, 0.5)
    assert c["loglik"] == pytest.approx((2 * lp[1] + lp[1] + lp[2]) / 2, abs=1e-5)


def test_greedy_never_picks_a_padding_id():
    model = FixedModel([0.1, 0.3, 0.6])  # id 2 pads the vocabulary: the tokenizer has 2 ids
    rows = [([0], [1])]
    assert continuation_logprobs(model, rows, 16, 0, nullcontext(), CPU, 8, None, 1)[0][1] is False
    assert continuation_logprobs(model, rows, 16, 0, nullcontext(), CPU, 8, 2, 1)[0][1] is True


def test_left_truncation_keeps_the_continuation():
    seen = []

    class Recorder(FixedModel):
        def forward(self, idx):
            seen.append(idx.clone())
            return super().forward(idx)
    model = Recorder([0.25] * 4, block_size=4)
    continuation_logprobs(model, [([1, 2, 3, 1, 2], [3, 3])], 4, 0, nullcontext(), CPU, 8, None, 1)
    # eot + 5 + 2 ids cut to block_size + 1 = 5 from the left; the input is all but the last
    assert seen[0].tolist() == [[3, 1, 2, 3]]


def test_tokenisation_rule_on_bytes():
    enc = get_tokenizer("byte").encode
    head, cont = encode_pair(enc, "Question: 2+2?\nAnswer: ", "four")
    assert head == enc("Question: 2+2?\nAnswer:") and cont == enc(" four")  # the space moved to the continuation
    assert encode_pair(enc, "ab", "cd") == (enc("ab"), enc("cd"))


@needs_gpt2
def test_tokenisation_rule_on_gpt2():
    enc = get_tokenizer("gpt2", tiktoken_file=str(GPT2_FILE)).encode
    head, cont = encode_pair(enc, "The cat ", "sat")
    assert head == enc("The cat") and cont == enc(" sat") == [3332]  # " sat" is one token, "sat" another
    assert enc("sat") != [3332]
    # "hel" + "lo" merge into one token across the seam: the continuation is what follows len(encode(context))
    # ids of the whole, so "hello" counts as context and only " world" is scored (the harness's rule)
    head, cont = encode_pair(enc, "hel", "lo world")
    assert head == enc("hel") and len(head) == 1 and enc("hello world")[0] != head[0]
    assert cont == enc("hello world")[1:] == enc(" world")


def test_loglikelihoods_equal_transformers_on_the_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from hf import export_hf
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)).eval()
    export_hf(model, str(tmp_path / "hf"), eot_token=63)  # weights only: no tokenizer needed
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    rows = [(torch.randint(0, 63, (n,), generator=g).tolist(), torch.randint(0, 63, (m,), generator=g).tolist())
            for n, m in ((5, 3), (12, 1), (30, 4), (2, 7))]  # (30, 4) is cut from the left
    ours = continuation_logprobs(model, rows, 24, 63, nullcontext(), CPU, 3, None, 2)
    for (ctx, cont), (ll, greedy) in zip(rows, ours):
        ids = torch.tensor([[63] + ctx + cont])[:, -25:]
        with torch.no_grad():
            logp = hf(ids[:, :-1]).logits.float().log_softmax(-1)[0, -len(cont):]  # (n, V)
        target = torch.tensor(cont)
        assert ll == pytest.approx(logp.gather(1, target[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == target).all())


def random_task(n_items=7, vocab=50, seed=0):
    """A multiple-choice task of random ids with 2-4 choices per item (uneven, so ranks get uneven work)."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n_items):
        k = int(rng.integers(2, 5))
        choices = [rng.integers(0, vocab, int(rng.integers(1, 4))).tolist() for _ in range(k)]
        items.append((rng.integers(0, vocab, int(rng.integers(1, 20))).tolist(), choices, int(rng.integers(0, k)),
                      [len(c) + int(rng.integers(0, 3)) for c in choices]))
    return Task("rand", "choice", items, 0.3)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))


DDP_SCRIPT = """
import json, sys
from contextlib import nullcontext
import torch, torch.distributed as dist
sys.path[:0] = [{root!r}, {tests!r}]
from tasks import score_tasks
from test_tasks import random_task, tiny_gpt
dist.init_process_group("gloo")
model, calls = tiny_gpt(), []
model.register_forward_pre_hook(lambda module, args: calls.append(1))
scores = score_tasks(model, [random_task()], 63, nullcontext(), torch.device("cpu"), dist.get_rank(),
                     dist.get_world_size(), same_calls=True, batch_size=2)
with open({out!r} + f"/rank{{dist.get_rank()}}.json", "w") as f:
    json.dump({{"scores": scores, "calls": len(calls)}}, f)
dist.destroy_process_group()
"""


def test_two_ranks_give_the_counts_of_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(tmp_path)))
    out = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = score_tasks(tiny_gpt(), [random_task()], 63, nullcontext(), CPU, batch_size=2)["rand"]
    for r in ranks:
        got = r["scores"]["rand"]
        assert (got["acc"], got["acc_norm"], got["n"]) == (one["acc"], one["acc_norm"], one["n"]) and one["n"] == 7
        assert got["loglik"] == pytest.approx(one["loglik"], abs=1e-5)
    # uneven slices (4 and 3 items, different choice counts), yet the same number of forward calls (FSDP)
    assert ranks[0]["calls"] == ranks[1]["calls"]


TEXT_ITEMS = [{"context": f"q{i} ", "choices": [f"a{i}", f"b{i}"], "answer": i % 2} for i in range(6)]


def test_few_shot_prompts_are_deterministic():
    a, b = with_shots(TEXT_ITEMS, 2, seed=5), with_shots(TEXT_ITEMS, 2, seed=5)
    assert a == b and a != with_shots(TEXT_ITEMS, 2, seed=6)
    for item, shot in zip(TEXT_ITEMS, a):
        parts = shot["context"].split("\n\n")
        assert len(parts) == 3 and parts[-1] == item["context"]  # 2 solved examples, blank-line separated
        solved = {x["context"] + x["choices"][x["answer"]] for x in TEXT_ITEMS if x is not item}
        assert set(parts[:2]) <= solved  # other items, with their right answer; never the item itself
    assert with_shots(TEXT_ITEMS, 0, seed=5) == TEXT_ITEMS
    with pytest.raises(TaskError, match="needs more than 6 items"):
        with_shots(TEXT_ITEMS, 6, seed=5)


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_public_readers(tmp_path):
    hs = {"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she", "label": 1,
          "endings": ["eats [title] it.", "bakes  it."]}
    assert read_text_task(write_lines(tmp_path / "hs.jsonl", [hs]), hellaswag_item) == [
        {"context": "Baking: She mixes flour. Then she", "choices": [" eats. it.", " bakes it."], "answer": 1}]
    arc = {"question": {"stem": "Which is hot?", "choices": [{"text": "ice", "label": "1"},
                                                              {"text": "fire", "label": "2"}]}, "answerKey": "2"}
    assert read_text_task(write_lines(tmp_path / "arc.jsonl", [arc]), arc_item) == [
        {"context": "Question: Which is hot?\nAnswer:", "choices": [" ice", " fire"], "answer": 1}]
    piqa = tmp_path / "piqa"
    piqa.mkdir()
    (piqa / "valid-labels.lst").write_text("1\n0\n")
    path = write_lines(piqa / "valid.jsonl", [{"goal": "g1", "sol1": "x", "sol2": "y"},
                                              {"goal": "g2", "sol1": "z", "sol2": "w"}])
    assert [x["answer"] for x in read_text_task(path, piqa_item)] == [1, 0]
    copa = {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "He sang.", "question": "cause",
            "label": 0}
    expected = [{"context": "The man fell because", "choices": [" he slipped.", " he sang."], "answer": 0}]
    assert read_text_task(write_lines(tmp_path / "copa.jsonl", [copa]), copa_item) == expected
    (tmp_path / "copa.xml").write_text('<copa-corpus><item id="1" asks-for="cause" most-plausible-alternative="1">'
                                       '<p>The man fell.</p><a1>He slipped.</a1><a2>He sang.</a2></item></copa-corpus>')
    assert read_text_task(str(tmp_path / "copa.xml"), copa_item) == expected  # Balanced COPA's format
    lam = write_lines(tmp_path / "lambada.jsonl", [{"text": "he opened the door"}])
    assert read_text_task(lam, lambada_item) == [{"context": "he opened the", "continuation": " door"}]


def test_public_task_from_the_cache_and_its_missing_file(tmp_path):
    meta, tok = {"eot_token": 256, "tokenizer": "byte"}, get_tokenizer("byte")
    with pytest.raises(TaskError, match=r"needs .*hellaswag_val.jsonl, which is missing: run `python tasks.py "
                                        r"--download=hellaswag` \(from https://"):
        load_tasks("hellaswag", None, meta, 64, tokenizer=tok, cache=str(tmp_path))
    (tmp_path / "lambada").mkdir()
    write_lines(tmp_path / "lambada" / PUBLIC["lambada"][0], [{"text": "a b c"}, {"text": "d e f"}])
    [task] = load_tasks("lambada", None, meta, 64, tokenizer=tok, cache=str(tmp_path))
    assert (task.name, task.kind, task.chance) == ("lambada", "cloze", 0.0)
    assert task.items[0][:2] == (tok.encode("a b"), [tok.encode(" c")])


@pytest.mark.parametrize("args, why", [(["--download=bogus"], "cannot download bogus"),
                                       (["--download=own"], "cannot download own"),
                                       ([], "--download")])
def test_download_refuses_what_it_cannot_fetch(args, why):
    out = run_script("tasks.py", *args, timeout=60)
    assert out.returncode == 2 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_few_shot_examples_come_from_the_train_split(tmp_path):
    """Where a task has a train split, its examples are drawn from it, never from the items scored; without the
    split's file a k-shot run is refused (a silent fallback would change what the numbers mean)."""
    meta, tok = {"eot_token": 256}, get_tokenizer("byte")
    arc = lambda q, a: {"question": {"stem": q, "choices": [{"text": "no", "label": "A"},  # noqa: E731
                                                            {"text": a, "label": "B"}]}, "answerKey": "B"}
    (tmp_path / "arc_easy").mkdir()
    write_lines(tmp_path / "arc_easy" / PUBLIC["arc_easy"][0], [arc(f"test{i}?", f"t{i}") for i in range(4)])
    [zero] = load_tasks("arc_easy", None, meta, 256, tokenizer=tok, cache=str(tmp_path))  # 0-shot needs no split
    with pytest.raises(TaskError, match=r"task arc_easy:2 needs .*ARC-Easy-Train.jsonl, which is missing: run "
                                        r"`python tasks.py --download=arc_easy`"):
        load_tasks("arc_easy:2", None, meta, 256, tokenizer=tok, cache=str(tmp_path))
    train = [arc(f"train{i}?", f"r{i}") for i in range(5)]
    write_lines(tmp_path / "arc_easy" / PUBLIC["arc_easy"][1], train)
    [task] = load_tasks("arc_easy:2", None, meta, 256, tokenizer=tok, cache=str(tmp_path))
    solved = {f"Question: train{i}?\nAnswer: r{i}" for i in range(5)}
    for (context, *_), (plain, *_) in zip(task.items, zero.items):
        parts = bytes(context).decode().split("\n\n")
        assert len(parts) == 3 and set(parts[:2]) <= solved and parts[2] == bytes(plain).decode()
    again = load_tasks("arc_easy:2", None, meta, 256, tokenizer=tok, cache=str(tmp_path))[0]
    assert again.items == task.items  # a fixed seed
    with pytest.raises(TaskError, match="6-shot needs 6 examples in the task's train split, it has 5"):
        load_tasks("arc_easy:6", None, meta, 256, tokenizer=tok, cache=str(tmp_path))
    # a file x.jsonl takes its examples from x.train.jsonl when there is one
    path = write_lines(tmp_path / "mine.jsonl", [{"context": "x", "choices": ["a", "b"], "answer": 1}])
    write_lines(tmp_path / "mine.train.jsonl", [{"context": "p", "choices": ["q", "r"], "answer": 0}])
    [mine] = load_tasks(path + ":1", None, meta, 64, tokenizer=tok)
    assert mine.items[0][0] == list(b"pq\n\nx")


def test_generic_jsonl_task_and_its_chance(tmp_path):
    path = write_lines(tmp_path / "mine.jsonl", [{"context": "x", "choices": ["a", "b"], "answer": 1},
                                                 {"context": "y", "choices": ["a", "b", "c", "d"], "answer": 0}])
    [task] = load_tasks(path + ":1", None, {"eot_token": 256}, 64, tokenizer=get_tokenizer("byte"))
    assert (task.name, task.kind, task.chance) == ("mine", "choice", pytest.approx((1 / 2 + 1 / 4) / 2))
    assert task.items[1][0] == list(b"xb\n\ny")  # 1-shot: the other item, solved, then a blank line


def test_own_task_from_the_validation_documents():
    eot, rng = 99, np.random.default_rng(0)
    docs = [rng.integers(10 * d, 10 * d + 10, size=int(rng.integers(40, 80))) for d in range(5)]  # disjoint ids
    val = np.concatenate([np.concatenate([[eot], d]) for d in docs])
    task = own_task(val, eot, 32, 50, seed=3, nbytes=len)
    assert len(task.items) == 50 and task.chance == 0.25
    answers = set()
    for passage, choices, answer, nbytes in task.items:
        assert len(passage) == 28 and all(len(c) == 4 for c in choices) and nbytes == [4] * 4  # 28 + 4 = block_size
        doc = passage[0] // 10
        assert {t // 10 for t in passage + choices[answer]} == {doc}  # the true span is the same document's ...
        text = ",".join(map(str, val.tolist())) + ","
        assert ",".join(map(str, passage + choices[answer])) + "," in text  # ... and follows the passage
        assert all({t // 10 for t in c} != {doc} for i, c in enumerate(choices) if i != answer)  # others: not
        answers.add(answer)
    assert answers == {0, 1, 2, 3}
    assert own_task(val, eot, 32, 50, seed=3, nbytes=len) == task  # a fixed seed, the same items
    with pytest.raises(TaskError, match="needs 2 validation documents"):
        own_task(val[:60], eot, 32, 5, seed=3, nbytes=len)


# --- the scripts, as a user runs them
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny run with the own task: evaluations at 0, 2 and 4, task scores at 0 and 4 (task_eval_interval=4)."""
    rng, root = np.random.default_rng(0), tmp_path_factory.mktemp("tasks")
    val = np.concatenate([np.concatenate([[59], np.resize(rng.integers(0, 59, 97), 60)]) for _ in range(20)])
    data = make_dataset(root / "data", val_ids=val)
    out = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={root / 'out'}", "--max_iters=4",
                     "--eval_interval=2", "--eval_tasks=own", "--task_items=40", "--task_eval_interval=4")
    assert out.returncode == 0, out.stderr[-3000:]
    return root, data


def test_train_logs_task_scores_at_the_chosen_evaluations(trained_run):
    root, _ = trained_run
    _, evals = read_log(root / "out")
    assert [e["iter"] for e in evals] == [0, 2, 4]
    assert ["task/own/acc" in e for e in evals] == [True, False, True]
    last = evals[-1]
    assert last["task/own/centered"] == pytest.approx((last["task/own/acc"] - 0.25) / 0.75)
    assert last["task/mean_centered"] == last["task/own/centered"] and last["task_seconds"] > 0
    assert 0 <= last["task/own/acc_norm"] <= 1


@pytest.mark.parametrize("bad, why", [("nope", "unknown task 'nope'"), ("missing.jsonl", "does not exist")])
def test_train_refuses_a_bad_task(tmp_path, data_dir, bad, why):
    out = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=2",
                     f"--eval_tasks={bad}")
    assert out.returncode == 2 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_evaluate_cli_matches_the_scores_in_process(trained_run, tmp_path):
    root, data = trained_run
    # characters below the dataset's 60 ids (it calls itself byte-level)
    mine = write_lines(tmp_path / "mine.jsonl", [{"context": chr(33 + i), "choices": ["01", "2"], "answer": i % 2}
                                                 for i in range(5)])
    out = run_script("-m", "experiments.evaluate", f"--out_dir={root / 'out'}", f"--tasks=own,{mine}",
                     f"--out={tmp_path / 'r.json'}", "--items=30")
    assert out.returncode == 0, out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"own", "mine"} and result["own"]["n"] == 30 and result["mine"]["n"] == 5
    model = GPT(GPTConfig(**torch.load(root / "out" / "ckpt.pt", weights_only=True)["model_config"]))
    model.load_state_dict(torch.load(root / "out" / "ckpt.pt", weights_only=True)["model"])
    val = np.fromfile(os.path.join(data, "val.bin"), dtype=np.uint16)
    tasks = load_tasks(f"own,{mine}", val, {"eot_token": 59, "tokenizer": "byte"}, 16, 30,
                       tokenizer=get_tokenizer("byte"))
    for name, s in score_tasks(model, tasks, 59, nullcontext(), CPU).items():
        assert result[name]["acc"] == s["acc"] and result[name]["acc_norm"] == s["acc_norm"]
        assert math.isclose(result[name]["loglik"], s["loglik"], abs_tol=1e-4)
    # the file form of the command gives the same file
    again = run_script("experiments/evaluate.py", f"--out_dir={root / 'out'}", f"--tasks=own,{mine}",
                       f"--out={tmp_path / 'r2.json'}", "--items=30")
    assert again.returncode == 0 and json.loads((tmp_path / "r2.json").read_text()) == result, again.stderr


@pytest.mark.parametrize("line, why", [
    ("{not json", ":2: not a JSON object"),
    ('{"context": "x", "choices": ["a", "b"], "answer": 2}', ':2: "answer" must be an index into the 2 choices'),
    ('{"context": "x", "choices": ["a"], "answer": 0}', ':2: "choices" must be a list of at least 2'),
    ('{"context": "", "choices": ["a", "b"], "answer": 0}', ':2: needs a non-empty "context"'),
    ('{"context": "x", "continuation": ""}', ':2: "continuation" must be a non-empty string'),
    ('{"context": "x", "choices": ["a", "' + "b" * 40 + '"], "answer": 0}', "does not fit block_size=16"),
])
def test_evaluate_bad_input_is_one_line_and_nothing_written(trained_run, tmp_path, line, why):
    root, _ = trained_run
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "ok", "choices": ["a", "b"], "answer": 0}\n' + line + "\n")
    out = run_script("-m", "experiments.evaluate", f"--out_dir={root / 'out'}", f"--tasks={path}",
                     f"--out={tmp_path / 'r.json'}")
    assert out.returncode == 2 and why in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert str(path) in out.stderr or "block_size" in why
    assert not (tmp_path / "r.json").exists() and "Traceback" not in out.stderr


def test_evaluate_refuses_a_missing_checkpoint_and_flag(tmp_path):
    out = run_script("-m", "experiments.evaluate", f"--out_dir={tmp_path}", "--tasks=own", f"--out={tmp_path}/r.json")
    assert out.returncode == 2 and "no checkpoint at" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_script("-m", "experiments.evaluate", f"--out_dir={tmp_path}", "--tasks=own")
    assert out.returncode == 2 and "--out" in out.stderr and len(out.stderr.strip().splitlines()) == 1

