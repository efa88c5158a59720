"""bench/prepare_data.py: speed and peak memory of prepare_data.py with GPT-2 tokenisation.

Run:
    python -m bench.prepare_data                              # 100 MB and 250 MB corpora, all cores
    python -m bench.prepare_data --sizes_mb 20 50 --num_proc 2 --tiktoken_file=PATH/gpt2.tiktoken

It generates a deterministic jsonl corpus in a temporary folder (prose drawn from a Zipf law over words
of the standard library's sources, mixed with slices of real Python code, so BPE has realistic work),
then for each size:
  - baseline: one process calling enc.encode_ordinary on each document in turn (only the calls are
    timed; reading and JSON parsing are left out, which favours the baseline);
  - ceiling: the baseline's encode calls shared among --num_proc processes (documents read and
    parsed before the clock starts), nothing else: how well this machine lets several encoders
    run side by side at all, the most any parallel tokeniser could reach here;
  - prepare_data.py as a subprocess on the same files (whole wall time: start-up, reading, parsing,
    tokenising, writing); the token counts of the two must agree (prepare adds one eot per document).
The three alternate --repeats times and the best speed of each is kept, as this machine's speed
drifts.
The CPU time that other processes took during each measurement is printed too ("other load"), since
a busy machine makes the parallel run look slower than it is. Peak memory of the prepare run is
reported two ways: the largest RSS of any single process of the run (parent or worker, from wait4),
and the peak of the PSS summed over the whole process tree (sampled every 0.2 s from /proc; PSS
splits shared pages between processes, so the sum does not double count).
The corpus is deleted at the end unless --keep.
"""

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run by path, not with -m: the modules it imports are one folder up
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import prepare_data
from tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[1]
FILE_MB = 25  # the corpus is written as files of this size, so a smaller size is a prefix of a larger


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", type=int, nargs="+", default=[100, 250], help="corpus sizes to measure")
    p.add_argument("--num_proc", type=int, default=prepare_data.default_num_proc())
    p.add_argument("--tiktoken_file", default=str(REPO.parent / "shared/tokenizers/gpt2.tiktoken"))
    p.add_argument("--workdir", help="where to generate the corpus (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated corpus and datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="alternate runs per size; the best speed is kept")
    return p.parse_args()


# ----------------------------------------------------------------------------- the corpus

def stdlib_texts() -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in prepare_data.stdlib_files(max_bytes=None)]


def word_list(texts: list[str], size: int = 30000) -> np.ndarray:
    """The most frequent words of the texts, most frequent first (ties by spelling, for determinism)."""
    counts = {}
    for text in texts:
        for word in re.findall(r"[A-Za-z]{2,}", text):
            counts[word] = counts.get(word, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:size]
    return np.array([word for word, _ in ranked], dtype=object)


def prose_document(rng: np.random.Generator, words: np.ndarray, n_words: int) -> str:
    """Sentences of Zipf-distributed words with capitals, commas, numbers and paragraphs."""
    picks = words[np.minimum(rng.zipf(1.2, n_words), len(words)) - 1].tolist()
    sentences, start = [], 0
    while start < n_words:
        length = int(rng.integers(6, 24))
        sentence = picks[start:start + length]
        if rng.random() < 0.3:
            sentence.insert(int(rng.integers(0, len(sentence) + 1)), str(int(rng.integers(0, 100000))))
        if len(sentence) > 4:
            sentence[2] += ","
        sentences.append(" ".join(sentence).capitalize() + (". " if rng.random() < 0.85 else ".\n\n"))
        start += length
    return "".join(sentences)


def code_document(rng: np.random.Generator, texts: list[str], n_chars: int) -> str:
    text = texts[int(rng.integers(0, len(texts)))]
    start = int(rng.integers(0, max(len(text) - n_chars, 1)))
    return text[start:start + n_chars]


def generate_corpus(folder: Path, total_mb: int, seed: int) -> list[Path]:
    """Files of FILE_MB MB of jsonl documents; the same seed gives the same files."""
    rng = np.random.default_rng(seed)
    texts = stdlib_texts()
    words = word_list(texts)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(-(-total_mb // FILE_MB)):
        path = folder / f"corpus_{index:03d}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            while f.tell() < FILE_MB * 1_000_000:
                size = int(rng.lognormal(mean=7.5, sigma=0.8))  # ~1.8 kB median, long tail
                if rng.random() < 0.25:
                    doc = code_document(rng, texts, size)
                else:
                    doc = prose_document(rng, words, max(size // 6, 1))
                f.write(json.dumps({"text": doc}) + "\n")
        files.append(path)
    return files


def files_for(files: list[Path], size_mb: int) -> list[Path]:
    return files[:-(-size_mb // FILE_MB)]


# ----------------------------------------------------------------------------- measurements

def busy_cpu_seconds() -> float:
    """CPU seconds spent by the whole machine (all processes) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")



def baseline(files: list[Path], tiktoken_file: str) -> dict:
    """One process, one enc.encode_ordinary call per document; only the calls are timed."""
    enc = get_tokenizer("gpt2", tiktoken_file).encoding
    tokens = documents = 0
    seconds = 0.0
    busy, own, wall = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                text = json.loads(line)["text"]
                start = time.perf_counter()
                ids = enc.encode_ordinary(text)
                seconds += time.perf_counter() - start
                tokens += len(ids)
                documents += bool(text.strip())
    other = busy_cpu_seconds() - busy - (time.process_time() - own)
    return {"tokens": tokens, "documents": documents, "seconds": seconds,
            "other_load": other / (time.perf_counter() - wall)}


def _ceiling_worker(files, rank, n, tiktoken_file, barrier, results) -> None:
    enc = get_tokenizer("gpt2", tiktoken_file).encoding
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for i, line in enumerate(f) if i % n == rank]
    barrier.wait()  # every process has its documents in memory: encoding starts together
    tokens = sum(len(enc.encode_ordinary(d)) for d in docs)
    results.put((tokens, time.perf_counter()))


def parallel_ceiling(files: list[Path], tiktoken_file: str, processes: int) -> dict:
    """The baseline's encode calls shared among `processes` processes (every n-th document each,
    read and parsed before the clock starts), nothing else: how far this machine lets several
    encoders run side by side, the most any parallel tokeniser could reach."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    workers = [ctx.Process(target=_ceiling_worker, args=(files, r, processes, tiktoken_file, barrier, results))
               for r in range(processes)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across the processes of one machine
    done = [results.get() for _ in workers]
    for w in workers:
        w.join()
    return {"tokens": sum(t for t, _ in done), "seconds": max(end for _, end in done) - start}


def tree_pss_kb(pid: int) -> int:
    """Proportional set size of pid and all its descendants, in kB (0 for processes already gone)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, ValueError):
        return total
    return total + sum(tree_pss_kb(int(child)) for child in children)


def run_prepare(files: list[Path], out_dir: Path, num_proc: int, tiktoken_file: str) -> dict:
    command = [sys.executable, str(REPO / "prepare_data.py"), "--input", *map(str, files), "--name=bench",
               f"--out_dir={out_dir}", "--tokenizer=gpt2", f"--tiktoken_file={tiktoken_file}",
               f"--num_proc={num_proc}", "--val_fraction=0.005", "--overwrite"]
    peak_pss = [0]
    start, busy = time.perf_counter(), busy_cpu_seconds()
    with open(out_dir.parent / "prepare.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample():
            while not done.wait(0.2):
                peak_pss[0] = max(peak_pss[0], tree_pss_kb(proc.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4 gives this child's rusage, which includes the workers it waited for: max RSS over all.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - start
    other = busy_cpu_seconds() - busy - (usage.ru_utime + usage.ru_stime)
    if proc.returncode != 0:
        sys.exit(f"prepare_data.py failed, see {out_dir.parent / 'prepare.log'}")
    meta = json.loads((out_dir / "bench/meta.json").read_text())
    return {"seconds": seconds, "meta": meta, "max_rss_mb": usage.ru_maxrss / 1024, "pss_mb": peak_pss[0] / 1024,
            "other_load": other / seconds}


# ----------------------------------------------------------------------------- report

def measure(files, size_mb, args, workdir) -> dict:
    """Baseline and prepare, alternated args.repeats times; the best speed of each, the worst memory."""
    chosen = files_for(files, size_mb)
    bases, preps, ceilings = [], [], []
    for _ in range(args.repeats):
        bases.append(baseline(chosen, args.tiktoken_file))
        ceilings.append(parallel_ceiling(chosen, args.tiktoken_file, args.num_proc))
        preps.append(run_prepare(chosen, workdir / "out", args.num_proc, args.tiktoken_file))
    base = min(bases, key=lambda b: b["seconds"])
    prep = min(preps, key=lambda p: p["seconds"])
    ceiling = min(ceilings, key=lambda c: c["seconds"])
    meta = prep["meta"]
    documents = meta["train_documents"] + meta["val_documents"]
    if meta["train_tokens"] + meta["val_tokens"] - documents != base["tokens"]:
        sys.exit(f"token counts disagree: prepare {meta['train_tokens'] + meta['val_tokens']} - {documents} eot "
                 f"vs baseline {base['tokens']}")
    return {"input_mb": sum(p.stat().st_size for p in chosen) / 1e6, "documents": documents,
            "tokens": base["tokens"], "base_tps": base["tokens"] / base["seconds"],
            "prep_tps": base["tokens"] / prep["seconds"], "prep_seconds": prep["seconds"],
            "ceiling_tps": ceiling["tokens"] / ceiling["seconds"],
            "max_rss_mb": max(p["max_rss_mb"] for p in preps), "pss_mb": max(p["pss_mb"] for p in preps),
            "other_load": max(r["other_load"] for r in bases + preps)}


def print_report(rows: list[dict], args) -> None:
    import tiktoken
    print(f"machine: {prepare_data.default_num_proc()} CPUs usable, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, tiktoken {tiktoken.__version__}, numpy {np.__version__}")
    print(f"prepare_data.py --tokenizer=gpt2 --num_proc={args.num_proc} against a 1-process encode_ordinary "
          f"loop; best of {args.repeats} alternated runs each; memory: the worst run")
    header = (f"{'corpus':>9} {'documents':>10} {'tokens':>12} {'baseline tok/s':>15} {'prepare tok/s':>14} "
              f"{'speedup':>8} {'ceiling':>8} {'prepare s':>10} {'max RSS/proc':>13} {'peak PSS sum':>13} "
              f"{'other load':>11}")
    print(header)
    for r in rows:
        print(f"{r['input_mb']:>6.0f} MB {r['documents']:>10,} {r['tokens']:>12,} {r['base_tps']:>15,.0f} "
              f"{r['prep_tps']:>14,.0f} {r['prep_tps'] / r['base_tps']:>7.2f}x "
              f"{r['ceiling_tps'] / r['base_tps']:>7.2f}x {r['prep_seconds']:>10.1f} "
              f"{r['max_rss_mb']:>10.0f} MB {r['pss_mb']:>10.0f} MB {r['other_load']:>7.2f} CPU")
    print(f"ceiling: {args.num_proc} processes running only the encode calls, against the same baseline (the most "
          f"{args.num_proc} encoders scale on this machine)")
    print("other load: CPUs busy with other processes during the measurement (should be ~0 for a fair run)")


def main():
    args = parse_args()
    if not Path(args.tiktoken_file).is_file():
        sys.exit(f"bench/prepare_data.py: error: {args.tiktoken_file} not found: pass --tiktoken_file=PATH")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_prepare_data_"))
    try:
        start = time.perf_counter()
        files = generate_corpus(workdir / "corpus", max(args.sizes_mb), args.seed)
        os.sync()  # flush the new files first: write-back running under a measurement slows it down
        print(f"generated {sum(p.stat().st_size for p in files) / 1e6:.0f} MB of jsonl in "
              f"{time.perf_counter() - start:.0f} s under {workdir}", flush=True)
        rows = [measure(files, size, args, workdir) for size in sorted(args.sizes_mb)]
        print_report(rows, args)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
