"""
The path a new user walks, run as the user runs it: one text file prepared, trained on and sampled; a model's own
tokenizer.json; every bench/ and experiments/ script by path and as a module; error messages that name only flags
that exist; presets that keep to their own out_dir.
"""
import ast
import json
import os
import re
import socket
import time
from pathlib import Path

import numpy as np
import pytest

import prepare_data as pd
import sample
import configurator
from conftest import ROOT, TINY, run_script
from tokenizer import TokenizerError

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*)")
SCRIPTS = ["train.py", "sample.py", "prepare_data.py", "tasks.py",
           *sorted(f"{d}/{f.name}" for d in ("bench", "experiments") for f in (ROOT / d).glob("*.py"))]


def one_line_error(out) -> str:
    """The single stderr line of a refused command (exit code 2); fails if there is more, or a traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    return out.stderr.strip()


def prepare(*args, cwd):
    return run_script(ROOT / "prepare_data.py", "--num_proc=1", *args, cwd=cwd, timeout=120)


def split_at(ids, eot):
    """Token ids cut into documents at the eot id (each document's ids, eot dropped)."""
    ids = np.asarray(ids, dtype=np.int64)
    return [d[1:].tolist() for d in np.split(ids, np.flatnonzero(ids == eot))[1:]]


# --- one text file just works (issue 24, item 1)
def test_one_text_file_is_split_by_tokens_and_trains(tmp_path):
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000))
    (tmp_path / "input.txt").write_text(text)
    out = prepare("--input=input.txt", "--name=x", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "val is the last 0.01 of the tokens" in out.stdout
    folder = tmp_path / "data/x"
    meta = json.loads((folder / "meta.json").read_text())
    train_ids, val_ids = (np.fromfile(folder / f"{s}.bin", dtype="<u2") for s in ("train", "val"))
    stream = np.concatenate([[256], np.frombuffer(text.encode(), np.uint8)])  # byte tokens, eot before the document
    assert np.array_equal(np.concatenate([train_ids, val_ids]), stream)
    assert len(val_ids) == round(0.01 * len(stream)) == meta["val_tokens"]
    assert (meta["split"], meta["train_tokens"], meta["train_documents"]) == ("tokens", len(train_ids), 1)
    done = run_script(ROOT / "train.py", *TINY, "--max_iters=2", "--eval_interval=2", f"--data_dir={folder}",
                      f"--out_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out/ckpt.pt").is_file()


@pytest.mark.parametrize("files, args", [
    ({"a.txt": "one\n\ntwo\n"}, ["--txt_split=blank_lines", "--val_fraction=1e-9"]),  # no document hashes to val
    ({"a.txt": "one\n\ntwo\n"}, ["--txt_split=blank_lines", "--val_fraction=0.999999"]),  # ... or all of them do
    ({"a.txt": "x"}, []),  # the smallest document: eot and one byte
    ({"a.jsonl": '{"text": "only one"}\n{"text": ""}\n'}, []),
])
def test_a_split_left_empty_by_documents_is_cut_from_the_tokens(tmp_path, files, args):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    out = prepare(*[f"--input={n}" for n in files], "--name=ds", *args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "data/ds/meta.json").read_text())
    assert meta["split"] == "tokens" and meta["train_tokens"] >= 1 and meta["val_tokens"] >= 1
    sizes = [os.path.getsize(tmp_path / f"data/ds/{s}.bin") // 2 for s in ("train", "val")]
    assert sizes == [meta["train_tokens"], meta["val_tokens"]]


@pytest.mark.parametrize("files, args, says", [
    ({"a.txt": "one long document\n"}, ["--val_docs=1"], "--val_docs=1 leaves no training document"),
    ({"a.txt": "one\n\ntwo\n"}, ["--txt_split=blank_lines", "--val_docs=2"], "leaves no training document"),
    ({"a.txt": "  \n\n", "b.txt": ""}, [], "empty corpus"),  # only empty documents
    ({"a.jsonl": '{"text": ""}\n{"text": " "}\n'}, [], "empty corpus"),
])
def test_a_split_that_cannot_be_made_says_what_to_do_in_one_line(tmp_path, files, args, says):
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    line = one_line_error(prepare(*[f"--input={n}" for n in files], "--name=ds", *args, cwd=tmp_path))
    assert says in line
    assert set(FLAG.findall(line)) <= help_flags("prepare_data.py"), line
    assert not (tmp_path / "data").exists()


# --- a model's own tokenizer.json (issue 21, item 3)
def tiny_tokenizer_folder(folder: Path, bos: bool):
    """A byte-level BPE tokenizer.json trained on a few sentences, as a checkpoint folder holds it."""
    tokenizers = pytest.importorskip("tokenizers")  # (requirements-test.txt installs it)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    sentences = ["the quick brown fox jumps over the lazy dog. " * 5, "hello world, héllo wörld"]
    tok.train_from_iterator(sentences, trainer)
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "<|endoftext|>"} if bos else {"eos_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


DOCS = ["the quick brown fox", "hello world, héllo wörld\nover the lazy dog", "a document that writes <|endoftext|>",
        "jumps", "dog dog dog. the end"]


def test_hf_tokenizer_gives_the_ids_of_tokenizers_itself(tmp_path):
    tok = tiny_tokenizer_folder(tmp_path / "model", bos=True)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    out = prepare("--input=docs.jsonl", "--name=hf", "--tokenizer=hf:model", "--val_docs=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    meta = json.loads((tmp_path / "data/hf/meta.json").read_text())
    bos = tok.token_to_id("<s>")
    assert meta["tokenizer"] == f"hf:{tmp_path / 'model'}" and meta["eot_token"] == bos
    assert meta["eot_source"].startswith("bos_token '<s>'") and meta["vocab_size"] == tok.get_vocab_size()
    ids = np.concatenate([np.fromfile(tmp_path / f"data/hf/{s}.bin", dtype="<u2") for s in ("train", "val")])
    # the literal "<|endoftext|>" in a document is text, as tiktoken's encode_ordinary makes it
    tok.encode_special_tokens = True
    expected = [tok.encode(d, add_special_tokens=False).ids for d in DOCS]
    assert sorted(split_at(ids, bos)) == sorted(expected)
    assert tok.token_to_id("<|endoftext|>") not in ids


def test_hf_tokenizer_without_bos_separates_documents_by_eos(tmp_path):
    tok = tiny_tokenizer_folder(tmp_path / "model", bos=False)
    tokenizer = pd.get_tokenizer(f"hf:{tmp_path / 'model' / 'tokenizer.json'}")  # the file itself works too
    assert tokenizer.eot_token == tok.token_to_id("<|endoftext|>") and tokenizer.eot_source.startswith("eos_token")
    assert tokenizer.decode(tokenizer.encode(DOCS[1])) == DOCS[1]
    (tmp_path / "empty").mkdir()
    line = one_line_error(prepare("--input=x.txt", "--tokenizer=hf:empty", cwd=tmp_path))
    assert f"cannot read the tokenizer hf:{tmp_path / 'empty'} " in line


# --- sampling (issue 24, item 2)
@pytest.fixture(scope="module")
def short_docs_run(tmp_path_factory):
    """A tiny model trained on byte tokens of many short documents, so that it writes end-of-text often."""
    root = tmp_path_factory.mktemp("short_docs")
    words = ["cat", "dog", "a fox", "the end", "hi", "ok"]
    (root / "docs.txt").write_text("\n\n".join(f"{words[i % 6]} and {words[i * 7 % 5]}, number {i % 13}"
                                              for i in range(3000)) + "\n")  # ~25 byte tokens each
    assert prepare("--input=docs.txt", "--name=docs", "--txt_split=blank_lines", "--val_fraction=0.05",
                   cwd=root).returncode == 0
    out = run_script(ROOT / "train.py", *TINY, "--max_iters=60", "--eval_interval=60", "--block_size=32",
                     f"--data_dir={root / 'data/docs'}", f"--out_dir={root / 'run'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run"


def test_samples_print_documents_apart_not_the_eot_literal(short_docs_run):
    out = run_script(ROOT / "sample.py", f"--out_dir={short_docs_run}", "--max_new_tokens=120", "--device=cpu")
    assert out.returncode == 0, out.stderr
    assert "<|endoftext|>" not in out.stdout and "~~~ end of document ~~~" in out.stdout
    assert sample.split_documents([1, 2, 9, 3, 9], 9) == [[1, 2], [3], []]


def test_hf_checkpoint_samples_with_its_own_tokenizer(tmp_path):
    tiny_tokenizer_folder(tmp_path / "model", bos=True)
    (tmp_path / "docs.txt").write_text("\n\n".join(DOCS * 200))
    assert prepare("--input=docs.txt", "--name=hf", "--tokenizer=hf:model", "--txt_split=blank_lines",
                   cwd=tmp_path).returncode == 0
    out = run_script(ROOT / "train.py", *TINY, "--max_iters=2", "--eval_interval=2", "--block_size=8",
                     f"--data_dir={tmp_path / 'data/hf'}", f"--out_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_script(ROOT / "sample.py", f"--out_dir={tmp_path / 'run'}", "--start=héllo wörld", "--num_samples=1",
                     "--max_new_tokens=5", "--device=cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("héllo wörld")  # a byte tokenizer's decoding of these ids would not give it


def test_gpt2_offline_fails_in_seconds_naming_a_flag_of_sample(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # nothing cached

    def unanswered(*args, **kwargs):  # a name lookup that hangs, as behind a silent firewall
        time.sleep(10)
        raise OSError("timed out")
    monkeypatch.setattr(socket, "create_connection", unanswered)
    start = time.perf_counter()
    with pytest.raises(TokenizerError, match="could not be fetched") as err:
        pd.get_tokenizer("gpt2")
    assert time.perf_counter() - start < 6
    flags = set(FLAG.findall(str(err.value)))
    assert flags == {"tiktoken_file"} and flags <= help_flags("sample.py") & help_flags("prepare_data.py")


# --- every script, both ways (issue 24, item 7)
_help = {}


def help_flags(script: str) -> set:
    """The flags `python SCRIPT --help` lists, run by path from another folder (as a user may)."""
    if script not in _help:
        out = run_script(ROOT / script, "--help", cwd=ROOT.parent, timeout=120)
        assert out.returncode == 0 and out.stdout.startswith("usage:"), (script, out.stderr[-2000:])
        _help[script] = set(FLAG.findall(out.stdout))
    return _help[script]


@pytest.mark.parametrize("script", [s for s in SCRIPTS if "/" in s])
def test_bench_and_experiments_scripts_run_by_path_and_as_modules(script):
    assert "help" in help_flags(script)
    out = run_script("-m", script[:-3].replace("/", "."), "--help", timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]


def test_probe_by_path_writes_next_to_the_run_and_says_only_what_it_wrote(short_docs_run):
    before = sorted(p.name for p in (ROOT / "experiments").iterdir())
    out = run_script(ROOT / "experiments/probe.py", short_docs_run, "--docs=4", "--tokens=64", cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    folder = short_docs_run / "probe"
    assert (folder / "probe.json").is_file() and (folder / "probe.md").is_file()
    # the png is claimed exactly when it was written (matplotlib may or may not be installed)
    assert ("probe_erank.png" in out.stdout.splitlines()[-1]) == (folder / "probe_erank.png").is_file()
    assert sorted(p.name for p in (ROOT / "experiments").iterdir()) == before


# --- error messages name flags that exist (issue 24, item 2's category)
# A message may name another program's flags after naming it ("prepare_data.py --val_docs=N", "torchrun --...").
OTHER_PROGRAMS = re.compile(r"\b(train\.py|sample\.py|prepare_data\.py|torchrun"
                            r"|torch\.distributed\.run|git rev-parse|huggingface-cli)\b")
TORCHRUN_FLAGS = {"standalone", "nproc_per_node", "nnodes", "node_rank", "rdzv_backend", "rdzv_endpoint", "rdzv_id"}
# Modules without a command line speak for the scripts that import them; scripts that build another script's command
# line hold its flags as plain strings.
SPEAKS_FOR = {"model.py": ["train.py"], "nitp.py": ["train.py"], "dataset.py": ["train.py"],
              "hf.py": ["sample.py", "train.py"], "tokenizer.py": ["sample.py"], "tasks.py": ["tasks.py", "train.py", "experiments/evaluate.py"],
              "bench/gpu.py": ["bench/gpu.py", "train.py"],
              "bench/prepare_data.py": ["bench/prepare_data.py", "prepare_data.py"],
              "experiments/gpu_nitp.py": ["experiments/gpu_nitp.py", "train.py"],
              "experiments/run_experiments.py": ["experiments/run_experiments.py", "train.py"]}
# tokenizer.py answers sample.py and prepare_data.py: its messages may name only flags both have.
SHARED = {"tokenizer.py": ({"get_tokenizer", "tiktoken_encoding", "HFTokenizer", "need"}, "prepare_data.py")}


def statement_texts(path: Path):
    """(line, function, text) per statement: its string literals (f-string parts, docstrings left out) in order."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and function is None:
            function = node.name
        if isinstance(node, ast.stmt):  # the statement's own expressions, not the statements it holds
            parts = [c for field, value in ast.iter_fields(node) if field not in ("body", "orelse", "finalbody",
                                                                                 "handlers")
                     for v in (value if isinstance(value, list) else [value]) if isinstance(v, ast.AST)
                     for c in ast.walk(v) if isinstance(c, ast.Constant) and isinstance(c.value, str)
                     and id(c) not in docstrings]
            parts.sort(key=lambda c: (c.lineno, c.col_offset))
            if parts:
                yield node.lineno, function, " ".join(c.value for c in parts)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, function)
    yield from visit(tree, None)


def test_every_flag_named_in_a_message_exists():
    wrong = []
    for file in [*SCRIPTS, "model.py", "nitp.py", "dataset.py", "hf.py", "tokenizer.py"]:
        own = set().union(*(help_flags(s) for s in SPEAKS_FOR.get(file, [file])))
        shared_functions, also = SHARED.get(file, (set(), None))
        for line, function, text in statement_texts(ROOT / file):
            pieces = OTHER_PROGRAMS.split(text)  # text, program, text, program, ...: flags belong to the last named
            for program, piece in zip([None, *pieces[1::2]], pieces[0::2]):
                if program is None:
                    flags = own & help_flags(also) if function in shared_functions else own
                else:
                    flags = (help_flags(program) if program in SCRIPTS else  # (git: not checked)
                             TORCHRUN_FLAGS if "torch" in program else None)
                wrong += [f"{file}:{line}: --{f}" for f in FLAG.findall(piece) if flags is not None and f not in flags]
    assert not wrong, "\n".join(wrong)


# --- presets (issue 24, item 10)
def test_every_preset_writes_to_its_own_out_dir():
    out_dirs = [[f for f in configurator.read_config_file(preset) if f.startswith("--out_dir=")]
                for preset in sorted((ROOT / "config").glob("*.py"))]
    assert all(len(o) == 1 for o in out_dirs), out_dirs
    out_dirs = [o[0] for o in out_dirs]
    assert len(set(out_dirs)) == len(out_dirs) and "--out_dir=out" not in out_dirs  # train.py's default is "out"
