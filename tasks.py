"""
Downstream scores: multiple-choice and cloze tasks scored by log-likelihood the way lm-evaluation-harness scores
them, during training (`train.py --eval_tasks=own,hellaswag`) and on checkpoints (`python -m experiments.evaluate`).

    python tasks.py --download=hellaswag,arc_easy          # public tasks into data/tasks/ (needs the network)
    tasks = load_tasks("own,arc_easy:5,my.jsonl", val_ids, meta, block_size, max_items=200)
    scores = score_tasks(model, tasks, ctx, device)        # {name: {"acc", "acc_norm", "centered", "n", ...}}

A task is a name: `own` (the dataset's own task, built from the validation split, no download), a public task
(PUBLIC below, read from data/tasks/<name>/), or a .jsonl file whose stem is its name, one item a line:
{"context": str, "choices": [str, ...], "answer": int} (multiple choice) or {"context": str, "continuation": str}
(cloze). `NAME:K` puts K solved examples before each context, drawn with a fixed seed from the task's train split
(PUBLIC's shots file; for a file x.jsonl, x.train.jsonl next to it) or, when it has none, from its other items.
"""
import json
import math
import os
import random
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

CACHE = os.path.join("data", "tasks")  # where the public tasks' files live (data/ is not committed)


class TaskError(Exception):
    """A task that cannot be read or scored: one line naming the file (and line) and the fix."""


@dataclass
class Task:
    name: str
    kind: str  # "choice" (acc picks the best-scoring choice) or "cloze" (acc: the greedy continuation is the target)
    items: list  # (context ids, [choice ids, ...], answer index, [choice length in UTF-8 bytes, ...])
    chance: float  # expected acc of a random guess, for the centred score


# --- public formats -> text items {"context", "choices", "answer"} or {"context", "continuation"}
def hellaswag_item(r, _):
    def clean(text):  # the harness's preprocessing of WikiHow's markup
        return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")
    context = clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
    return {"context": context, "choices": [" " + clean(e) for e in r["endings"]], "answer": int(r["label"])}


def arc_item(r, _):
    letter = {"1": "A", "2": "B", "3": "C", "4": "D", "5": "E"}  # a few items number their choices
    labels = [letter.get(c["label"], c["label"]) for c in r["question"]["choices"]]
    return {"context": f"Question: {r['question']['stem']}\nAnswer:",
            "choices": [" " + c["text"] for c in r["question"]["choices"]],
            "answer": labels.index(letter.get(r["answerKey"], r["answerKey"]))}


def piqa_item(r, label):
    return {"context": f"Question: {r['goal']}\nAnswer:", "choices": [" " + r["sol1"], " " + r["sol2"]],
            "answer": int(r["label"] if "label" in r else label)}


def copa_item(r, _):
    connector = {"cause": "because", "effect": "therefore"}[r["question"]]
    return {"context": r["premise"].strip()[:-1] + " " + connector,
            "choices": [" " + c[0].lower() + c[1:] for c in (r["choice1"], r["choice2"])], "answer": int(r["label"])}


def lambada_item(r, _):
    context, word = r["text"].rsplit(" ", 1)
    return {"context": context, "continuation": " " + word}


# name -> (file scored, in data/tasks/<name>/; its train split, where few-shot examples come from (None: the task's
# other items); the item reader; [(url, member of a zip or None), ...] for both; chance)
HS = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/"
ARC = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
PIQA = "https://yonatanbisk.com/piqa/data/"
COPA = "https://dl.fbaipublicfiles.com/glue/superglue/data/v2/COPA.zip"
PUBLIC = {
    "hellaswag": ("hellaswag_val.jsonl", "hellaswag_train.jsonl", hellaswag_item,
                  [(HS + "hellaswag_val.jsonl", None), (HS + "hellaswag_train.jsonl", None)], .25),
    "arc_easy": ("ARC-Easy-Test.jsonl", "ARC-Easy-Train.jsonl", arc_item,
                 [(ARC, "ARC-Easy-Test.jsonl"), (ARC, "ARC-Easy-Train.jsonl")], .25),
    "arc_challenge": ("ARC-Challenge-Test.jsonl", "ARC-Challenge-Train.jsonl", arc_item,
                      [(ARC, "ARC-Challenge-Test.jsonl"), (ARC, "ARC-Challenge-Train.jsonl")], .25),
    "piqa": ("valid.jsonl", "train.jsonl", piqa_item, [(PIQA + f, None) for f in (
        "valid.jsonl", "valid-labels.lst", "train.jsonl", "train-labels.lst")], .5),
    "copa": ("val.jsonl", "train.jsonl", copa_item, [(COPA, "val.jsonl"), (COPA, "train.jsonl")], .5),
    # Balanced COPA (Kavumba et al. 2019): COPA's dev set and its mirrored items, in COPA's XML; no train split
    "balanced_copa": ("balancedcopa-dev-all.xml", None, copa_item, [
        ("https://raw.githubusercontent.com/Balanced-COPA/Balanced-COPA/master/balancedcopa-dev-all.xml", None)], .5),
    "lambada": ("lambada_test.jsonl", None, lambada_item,
                [("https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl", None)], 0.0),
}


def read_records(path):
    """(line number, record) of a JSONL file or of COPA's XML (<item asks-for most-plausible-alternative>)."""
    if path.endswith(".xml"):
        try:
            items = ET.parse(path).getroot().findall("item")
        except ET.ParseError as e:
            raise TaskError(f"{path}: not COPA's XML ({e})") from None
        return [(i + 1, {"premise": x.findtext("p"), "choice1": x.findtext("a1"), "choice2": x.findtext("a2"),
                         "question": x.get("asks-for"), "label": int(x.get("most-plausible-alternative", 0)) - 1})
                for i, x in enumerate(items)]
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except ValueError as e:
                    raise TaskError(f"{path}:{n}: not a JSON object ({e}); one item per line") from None
    return records


def check_item(item, where):
    """A text item as the generic JSONL defines it, or TaskError naming where it came from."""
    if not isinstance(item, dict) or not isinstance(item.get("context"), str) or not item["context"]:
        raise TaskError(f"{where}: needs a non-empty \"context\" string")
    if "continuation" in item:
        if not isinstance(item["continuation"], str) or not item["continuation"]:
            raise TaskError(f"{where}: \"continuation\" must be a non-empty string")
        return item
    choices, answer = item.get("choices"), item.get("answer")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TaskError(f"{where}: \"choices\" must be a list of at least 2 non-empty strings "
                        f"(or give a \"continuation\" for a cloze item)")
    if type(answer) is not int or not 0 <= answer < len(choices):
        raise TaskError(f"{where}: \"answer\" must be an index into the {len(choices)} choices, not {answer!r}")
    return item


def read_text_task(path, reader=None):
    """The checked text items of a task file; reader maps a public format's record to an item."""
    labels = []  # PIQA keeps its labels in a separate file next to the items: valid.jsonl's in valid-labels.lst
    if reader is piqa_item and os.path.isfile(path.removesuffix(".jsonl") + "-labels.lst"):
        with open(path.removesuffix(".jsonl") + "-labels.lst") as f:
            labels = f.read().split()
    items = []
    for i, (n, record) in enumerate(read_records(path)):
        try:
            item = reader(record, labels[i] if i < len(labels) else None) if reader else record
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise TaskError(f"{path}:{n}: not a {reader.__name__[:-5]} record ({type(e).__name__}: {e})") from None
        items.append(check_item(item, f"{path}:{n}"))
    if not items:
        raise TaskError(f"{path} holds no items")
    if len({"continuation" in x for x in items}) > 1:
        raise TaskError(f"{path}: mixes cloze and multiple-choice items; put each kind in its own file")
    return items


# --- text -> ids, as lm-evaluation-harness does it
def encode_pair(encode, context, continuation):
    """(context ids, continuation ids): the context's trailing whitespace moves to the continuation, whose ids are
    those of encode(context + continuation) after the first len(encode(context)) (BPE merges across the seam)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    whole, head = encode(context + continuation), encode(context)
    return head, whole[len(head):]


def with_shots(items, k, seed, pool=None):
    """Each item's context preceded by k solved examples, blank-line separated, drawn with `seed` from `pool` (the
    task's train split) or, when None, from the task's other items."""
    if k == 0:
        return items
    if pool is not None and k > len(pool):
        raise TaskError(f"{k}-shot needs {k} examples in the task's train split, it has {len(pool)}")
    if pool is None and k >= len(items):
        raise TaskError(f"{k}-shot needs more than {k} items in the task, it has {len(items)}")
    rng, out = random.Random(seed), []
    for i, item in enumerate(items):
        shots = (rng.sample(pool, k) if pool is not None else
                 [items[j] for j in rng.sample(range(len(items)), k + 1) if j != i][:k])
        solved = [x["context"] + (x["continuation"] if "continuation" in x else x["choices"][x["answer"]])
                  for x in shots]
        out.append({**item, "context": "\n\n".join(solved + [item["context"]])})
    return out


def encode_task(name, items, encode, block_size, chance):
    """Text items -> a Task of ids; an item whose continuation alone exceeds block_size cannot be scored."""
    out = []
    for item in items:
        texts = [item["continuation"]] if "continuation" in item else item["choices"]
        pairs = [encode_pair(encode, item["context"], c) for c in texts]
        longest = max(len(cont) for _, cont in pairs)
        if longest > block_size:
            raise TaskError(f"task {name}: a continuation of {longest} tokens does not fit block_size={block_size} "
                            f"(context {item['context'][:40]!r}...): drop such items or train a longer block_size")
        out.append((pairs[0][0], [cont for _, cont in pairs], item.get("answer", 0),
                    [len(t.encode("utf-8")) for t in texts]))
    return Task(name, "cloze" if "continuation" in items[0] else "choice", out, chance)


# --- the dataset's own task
def own_task(val, eot, block_size, n_items, seed, nbytes):
    """"Which continuation is this document's own?" from the validation split (documents start with eot): a passage,
    its true next span and 3 spans of the same length from other documents. The span is 1/8 of block_size (at most
    32 tokens) and passage + span fill block_size, up to a passage of 8 spans (so long contexts still find documents
    long enough). nbytes(ids) -> UTF-8 length, for acc_norm."""
    val = np.asarray(val)
    starts = np.flatnonzero(val == eot) if eot is not None else np.zeros(0, dtype=np.int64)
    span = max(1, min(32, block_size // 8))
    passage = min(block_size - span, 8 * span)
    docs = [(s + 1, e) for s, e in zip(starts, list(starts[1:]) + [len(val)]) if e - s - 1 >= passage + span]
    if len(docs) < 2:
        raise TaskError(f"the own task needs 2 validation documents of at least {passage + span} tokens (each led by "
                        f"the eot id in meta.json), the data has {len(docs)}: prepare a corpus of more documents, or "
                        "leave `own` out of the tasks")
    rng, sizes, items = np.random.default_rng(seed), np.array([e - s for s, e in docs], dtype=np.float64), []
    for _ in range(n_items):
        d = rng.choice(len(docs), p=sizes / sizes.sum())  # by length: every token equally likely to start a passage
        at = docs[d][0] + rng.integers(0, docs[d][1] - docs[d][0] - passage - span + 1)
        spans = []
        for o in rng.choice([i for i in range(len(docs)) if i != d], size=3, replace=len(docs) < 4):
            s = docs[o][0] + rng.integers(0, docs[o][1] - docs[o][0] - span + 1)
            spans.append(val[s:s + span].tolist())
        answer = int(rng.integers(0, 4))
        spans.insert(answer, val[at + passage:at + passage + span].tolist())
        items.append((val[at:at + passage].tolist(), spans, answer, [nbytes(s) for s in spans]))
    return Task("own", "choice", items, 0.25)


def load_tasks(spec, val, meta, block_size, max_items=0, seed=1337, tokenizer=None, cache=CACHE):
    """Tasks named in the comma-separated spec (see the docstring), each cut to its first max_items (0 = all)."""
    if meta.get("eot_token") is None:
        raise TaskError("the dataset's meta.json names no eot_token, which the model reads first: rebuild the dataset "
                        "with prepare_data.py")
    tasks = []
    for entry in [s.strip() for s in spec.split(",") if s.strip()]:
        name, _, k = entry.rpartition(":") if re.fullmatch(r".+:\d+", entry) else (entry, "", "0")
        if name == "own":
            # Without a tokenizer to decode with, acc_norm divides by token counts (equal for the 4 spans).
            nbytes = (lambda ids: len(tokenizer.encoding.decode_bytes(ids))) if tokenizer else len
            tasks.append(own_task(val, meta.get("eot_token"), block_size, max_items or 1000, seed, nbytes))
            continue
        if name in PUBLIC:
            file, shots_file, reader, sources, chance = PUBLIC[name]
            path, shots = (os.path.join(cache, name, f) if f else None for f in (file, shots_file))
            for needed in [path] + ([shots] if int(k) and shots else []):
                if not os.path.isfile(needed):
                    raise TaskError(f"task {name}{':' + k if needed == shots else ''} needs {needed}, which is "
                                    f"missing: run `python tasks.py --download={name}` (from {sources[0][0]})")
        elif name.endswith(".jsonl") or os.path.isfile(name):
            path, reader, chance, shots = name, None, None, name.removesuffix(".jsonl") + ".train.jsonl"
            name = os.path.splitext(os.path.basename(name))[0]
            if not os.path.isfile(path):
                raise TaskError(f"task file {path} does not exist: give an existing .jsonl file")
            shots = shots if os.path.isfile(shots) else None  # no train split: the task's other items
        else:
            raise TaskError(f"unknown task {name!r}: give a .jsonl file or one of own, {', '.join(PUBLIC)}")
        if tokenizer is None:
            raise TaskError(f"task {name} is text and the dataset's tokenizer {meta.get('tokenizer')!r} is not "
                            f"available: pass --tiktoken_file for gpt2")
        items = read_text_task(path, reader)
        pool = read_text_task(shots, reader) if int(k) and shots else None
        items = with_shots(items, int(k), seed, pool)[:max_items or None]
        if chance is None:
            chance = 0.0 if "continuation" in items[0] else float(np.mean([1 / len(x["choices"]) for x in items]))
        tasks.append(encode_task(name, items, tokenizer.encode, block_size, chance))
    return tasks


# --- scoring
@torch.no_grad()
def continuation_logprobs(model, rows, block_size, eot, ctx, device, batch_size, n_tokens, n_calls):
    """rows: (context ids, continuation ids) -> per row (summed log-probability, greedy == continuation). The model
    reads eot, context, continuation, cut from the left to block_size + 1 tokens (the continuation is never cut).
    Makes exactly n_calls forward calls (dummy ones after the real work): under FSDP every rank must make the same."""
    out = []
    for b in range(n_calls):
        batch = rows[b * batch_size:(b + 1) * batch_size]
        if not batch:  # FSDP: this rank's slice is done, but each forward is a collective
            with ctx:
                model(torch.zeros(1, 1, dtype=torch.long, device=device))
            continue
        seqs = [([eot] + c + k)[-(block_size + 1):] for c, k in batch]
        width = max(len(s) for s in seqs) - 1
        x = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T): right-padding never reaches earlier positions
        y = torch.zeros(len(seqs), width, dtype=torch.long)  # (B, T): the next ids
        scored = torch.zeros(len(seqs), width, dtype=torch.bool)  # (B, T): the positions predicting the continuation
        for i, (s, (_, cont)) in enumerate(zip(seqs, batch)):
            x[i, :len(s) - 1], y[i, :len(s) - 1] = torch.tensor(s[:-1]), torch.tensor(s[1:])
            scored[i, len(s) - 1 - len(cont):len(s) - 1] = True
        x, y, scored = x.to(device), y.to(device), scored.to(device)
        with ctx:
            logits, _ = model(x)
        logits = logits.float()  # (B, T, V)
        logp = F.log_softmax(logits, dim=-1).gather(2, y[..., None]).squeeze(2)  # (B, T)
        hits = logits[..., :n_tokens].argmax(-1) == y  # (B, T): greedy decoding would produce the next id
        sums = torch.where(scored, logp, 0.0).sum(1).tolist()  # one host sync per batch
        greedy = (hits | ~scored).all(1).tolist()
        out += zip(sums, greedy)
    return out


def item_counts(task, items, results):
    """(acc, acc_norm, summed loglik) summed over items, from their rows' (loglik, greedy) in order."""
    acc = acc_norm = loglik = 0.0
    for _, choices, answer, nbytes in items:
        scores, results = results[:len(choices)], results[len(choices):]
        if task.kind == "cloze":  # one continuation: acc is the greedy match, acc_norm the same
            acc, acc_norm, loglik = acc + scores[0][1], acc_norm + scores[0][1], loglik + scores[0][0]
            continue
        ll = [s for s, _ in scores]
        acc += int(np.argmax(ll)) == answer  # argmax: a tie goes to the first choice, as in the harness
        acc_norm += int(np.argmax([s / n for s, n in zip(ll, nbytes)])) == answer
        loglik += ll[answer]
    return acc, acc_norm, loglik


@torch.no_grad()
def score_tasks(model, tasks, eot, ctx, device, rank=0, world_size=1, same_calls=False, batch_size=32, n_tokens=None):
    """{name: {"acc", "acc_norm", "centered", "chance", "n", "loglik"}} of each task, in eval mode. Rank r scores
    items r, r + W, ...; the counts are all-reduced. `model` must not be the DDP wrapper. same_calls (FSDP): every
    rank makes the same number of forward calls. eot: the end-of-text id, read first (every document starts with it).
    n_tokens: the tokenizer's vocabulary, so that greedy decoding never picks a padding id."""
    was_training = model.training
    model.eval()
    block_size = model.config.block_size
    results = {}
    for task in tasks:
        mine = task.items[rank::world_size]
        rows = [(c, k) for c, choices, _, _ in mine for k in choices]
        n_calls = math.ceil(len(rows) / batch_size)
        if same_calls and world_size > 1:
            calls = torch.tensor([n_calls], device=device)
            dist.all_reduce(calls, op=dist.ReduceOp.MAX)
            n_calls = int(calls.item())
        scored = continuation_logprobs(model, rows, block_size, eot, ctx, device, batch_size, n_tokens, n_calls)
        counts = torch.tensor([*item_counts(task, mine, scored), len(mine)], dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(counts)
        acc, acc_norm, loglik, n = counts.tolist()
        results[task.name] = {"acc": acc / n, "acc_norm": acc_norm / n, "centered": (acc / n - task.chance) /
                              (1 - task.chance), "chance": task.chance, "n": int(n), "loglik": loglik / n}
    model.train(was_training)
    return results


def log_record(scores):
    """The scores as flat log keys task/<name>/<metric> and task/mean_centered (nanochat's CORE: mean of centred)."""
    record = {f"task/{name}/{k}": v for name, s in scores.items() for k, v in s.items() if k not in ("n", "chance")}
    return {**record, "task/mean_centered": float(np.mean([s["centered"] for s in scores.values()]))}


# --- python tasks.py --download=NAME[,NAME]
def download(name, cache=CACHE):
    """Fetch a public task's files into cache/<name>/ (a zip's member is extracted), each written then renamed."""
    import io
    import urllib.request
    import zipfile
    folder = os.path.join(cache, name)
    os.makedirs(folder, exist_ok=True)
    fetched = {}  # a zip holding several of the files is fetched once
    for url, member in PUBLIC[name][3]:
        data = fetched[url] = fetched.get(url) or urllib.request.urlopen(url, timeout=60).read()
        if member:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                data = z.read(next(m for m in z.namelist() if os.path.basename(m) == member))
        path = os.path.join(folder, member or os.path.basename(url))
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return folder


if __name__ == "__main__":
    import argparse

    class ArgumentParser(argparse.ArgumentParser):
        def error(self, message):  # one line and exit code 2, instead of a usage block
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
    p = ArgumentParser(description="Download public tasks into data/tasks/.")
    p.add_argument("--download", required=True, help=f"comma-separated, of {', '.join(PUBLIC)}")
    names = [n for n in p.parse_args().download.split(",") if n]
    bad = [n for n in names if n not in PUBLIC]
    if bad:
        print(f"error: cannot download {', '.join(bad)}: choose from {', '.join(PUBLIC)}", file=sys.stderr)
        sys.exit(2)
    for n in names:
        try:
            print(f"{n}: {download(n)}")
        except OSError as e:
            print(f"error: cannot download {n} ({e}); with no network, copy its file into {CACHE}/{n}/",
                  file=sys.stderr)
            sys.exit(2)
