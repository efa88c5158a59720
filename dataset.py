"""
Token data for training: the folders prepare_data.py writes and llm.c / modded-nanogpt shards, memory-mapped, and the
windows of ids that make a batch.

    train, val, meta, where = dataset.load_data(data_dir="data/stdlib")
    train, val, meta, where = dataset.load_data(train_shards="fineweb10B/fineweb_train_*.bin", val_shards="...")
    x, y = dataset.get_batch(train, dataset.batch_offsets(len(train), block_size, batch_size, seed, step, micro), ...)

A folder holds meta.json (dtype, vocab_size, token counts, tokenizer, ...) and train.bin / val.bin: the ids of all
documents end to end, little-endian uint16 or uint32. prepare_data.py writes them; this is the reading side, apart so
that training and the probes import no tokenizer code. tests/test_prepare_data.py ties the two together.
"""
import glob
import json
import os

import numpy as np
import torch

REBUILD = "rebuild the dataset with prepare_data.py"


class DatasetError(Exception):
    """The data asked for is missing or damaged: one line that says how to fix it (train.py: exit code 2)."""


def read_meta(data_dir):
    """The folder's meta.json, checked for what training needs: dtype and vocab_size."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        name = os.path.basename(os.path.normpath(data_dir))
        hint = "python prepare_data.py" + ("" if name == "stdlib" else f" --input=YOUR_FILES --name={name}")
        raise DatasetError(f"no dataset in {data_dir} (no meta.json): build it with `{hint}`")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # not JSON, not UTF-8
        raise DatasetError(f"{path} is not readable JSON ({e}): {REBUILD}") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{path} is not a JSON object: {REBUILD}")
    dtype, vocab = meta.get("dtype"), meta.get("vocab_size")
    if dtype not in ("uint16", "uint32") or type(vocab) is not int or vocab < 1:  # what prepare_data.py writes
        raise DatasetError(f"{path} has dtype {dtype!r} and vocab_size {vocab!r}, where uint16 or uint32 and a "
                           f"positive integer are needed: {REBUILD}")
    return meta


def load_split(data_dir, split, meta):
    """One split's token ids ("train" or "val") as a read-only little-endian memmap."""
    path, dtype = os.path.join(data_dir, f"{split}.bin"), np.dtype(meta["dtype"]).newbyteorder("<")
    size, promised = os.path.getsize(path) if os.path.isfile(path) else 0, meta.get(f"{split}_tokens")
    if size == 0 or size % dtype.itemsize or (type(promised) is int and size != promised * dtype.itemsize):
        raise DatasetError(f"{path} is missing, empty or not the {promised} tokens meta.json promises: {REBUILD}")
    return np.memmap(path, dtype=dtype, mode="r")


def read_llmc_shard(path):
    """The uint16 ids of an llm.c shard (256 x int32 header: magic 20240520, version 1, count)."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype="<i4", count=256) if size >= 1024 else np.zeros(3, dtype="<i4")
    if header[0] != 20240520 or header[1] != 1 or size != 1024 + 2 * int(header[2]):
        raise DatasetError(f"{path} is not an llm.c token shard (bad header, or {size} bytes where the header "
                           f"promises {1024 + 2 * int(header[2])}): regenerate it")
    return np.memmap(path, dtype="<u2", mode="r", offset=1024, shape=(int(header[2]),))


class ShardedTokens:
    """llm.c shards seen as one sequence, memory-mapped; a window across a boundary is stitched."""
    def __init__(self, pattern):
        self.shards = [read_llmc_shard(p) for p in sorted(glob.glob(pattern))]
        if not self.shards:
            raise DatasetError(f"no llm.c shard matches {pattern!r}: give a glob like 'fineweb10B/fineweb_train_*.bin'")
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # (n_shards + 1,)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, window):  # a slice start:stop -> the pieces of every shard it overlaps, joined
        start, stop = window.start, window.stop
        return np.concatenate([s[max(0, start - a):stop - a] for s, a in zip(self.shards, self.starts)
                               if a < stop and a + len(s) > start])


def load_data(data_dir="", train_shards="", val_shards=""):
    """(train ids, val ids, meta, where): a prepared folder, or llm.c shards by glob (both globs or neither)."""
    if train_shards or val_shards:
        if not (train_shards and val_shards):
            raise DatasetError("give both --train_shards and --val_shards (globs of llm.c .bin shards)")
        meta = {"vocab_size": 50257, "tokenizer": "gpt2", "eot_token": 50256}  # llm.c's shards hold GPT-2 ids
        return ShardedTokens(train_shards), ShardedTokens(val_shards), meta, train_shards
    meta = read_meta(data_dir)
    train, val = load_split(data_dir, "train", meta), load_split(data_dir, "val", meta)
    # An id >= vocab_size would fail deep inside the first forward: check now (the recorded maximum, or a chunked scan).
    top = meta.get("max_token_id")
    if type(top) is not int:
        top = max(int(d[i:i + (1 << 24)].max()) for d in (train, val) for i in range(0, len(d), 1 << 24))
    if top >= meta["vocab_size"]:
        raise DatasetError(f"{data_dir} holds token id {top} but its meta.json says vocab_size={meta['vocab_size']}: "
                           f"the files do not match; {REBUILD}")
    return train, val, meta, data_dir


# --- batches: windows of ids, drawn from (seed, step, micro-batch) alone
def batch_offsets(n_tokens, block_size, batch_size, seed, step, micro):
    """Start offsets of one micro-batch, a pure function of (seed, step, global micro-batch index): no sampler state
    to save, the same tokens whatever the number of processes; rank r's micro-step m reads r * accumulation + m."""
    return np.random.default_rng([seed, step, micro]).integers(0, n_tokens - block_size - 1, size=batch_size)


def get_batch(data, offsets, block_size, device):
    """Inputs x and targets y (B, T): y is x shifted left by one token."""
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in offsets]).astype(np.int64))  # (B, T+1)
    # pinned host memory on CUDA: the copy does not wait for the GPU to be idle
    xy = xy.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else xy.to(device)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def val_offsets(n_tokens, block_size, batch_size, eval_iters):
    """Evenly spaced windows over the validation split, fixed for the whole run (and across runs)."""
    starts = np.linspace(0, n_tokens - block_size - 1, num=batch_size * eval_iters).astype(np.int64)
    return starts.reshape(eval_iters, batch_size)
