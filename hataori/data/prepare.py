"""``hataori data prepare``: encode corpora into token shards for training.

    hataori data prepare --input corpus.jsonl[:WEIGHT] ... --tokenizer DIR --output DIR [--workers N] \\
        [CONFIG.yaml ...] [key=value ...]

(YAML presets and overrides are positional: give them together, after or before the options.)

The main process reads the sources in order (through :mod:`hataori.corpus.sources`), decides
each document's split, and hands batches of documents to worker processes that each load the
tokenizer once. Results are taken back in submission order, so the shards are byte-identical
whatever the number of workers.

Split: a document goes to validation when a keyed hash of its text (``split_seed``) falls below
``val_fraction`` of the hash range, or, with ``val_docs=K``, among the K smallest hashes (which
costs one extra reading pass). Being decided by content, the split does not depend on the order
or number of the inputs, and exact duplicates land on the same side.

Output: ``train-NNNNN`` and ``val-NNNNN`` shards (see :mod:`hataori.data.shards`) of at most
``shard_tokens`` tokens each (a longer document gets a shard of its own), each written under a
temporary name and renamed when complete, and ``dataset.json`` last. A rerun after a crash or a
kill keeps the complete shards, re-reads the inputs without encoding the documents they hold, and
writes the rest; if the inputs or settings changed in between, it starts over. A complete dataset
from the same inputs and settings is left alone. The output folder is held under
:mod:`hataori.outputs`' contract (one prepare at a time; the inputs and the tokenizer are never the
output): another dataset, or one whose ``dataset.json`` is damaged, is refused unless ``--replace``,
which swaps the new dataset in only once it is complete, and anything but a dataset is refused either
way. A full disk is reported as such and leaves no shards behind.

Conversations: with ``chat_template`` (``--chat-template``) the inputs are JSONL conversations
(:mod:`hataori.data.chat`: ``messages``, or ``prompt`` and ``completion``), each rendered with the
template, encoded once with the mask of the tokens the loss counts, and written to shards of format
version 2 (ids and a ``.mask``); conversations over ``max_tokens`` follow the ``overlong`` rule, and the
manifest counts what was kept, truncated and dropped, and records the template (path, SHA-256, text).
The split is decided by a hash of the messages. An interrupted chat prepare starts over rather than
resuming (a dropped conversation leaves no document to count it by).

Source weights given with ``--input PATH:WEIGHT`` are recorded in the manifest; a dataset stores
each document once, and blending happens when training reads datasets (:mod:`hataori.data.loader`).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import heapq
import itertools
import json
import multiprocessing
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from hataori.config import command_items, load, require, to_dict
from hataori.corpus.sources import ReadStats, SourceConfig, expand, iter_documents, split_key
from hataori.errors import ConfigError, HataoriError
from hataori.fsutil import atomic_write_text, disk_full, disk_full_error, remove_stale_temps
from hataori.outputs import MARKER, claim
from hataori.sourcespec import parse_source
from hataori.tokenizer.model import Tokenizer
from hataori.data.chat import (OVERLONG_RULES, ConversationEncoder, EncodeCounts, EncodedConversations, check_template,
                               iter_conversations, payload, split_text)
from hataori.data.shards import (FORMAT_VERSION, MANIFEST, MASKED_VERSION, SPLITS, Shard, ShardError, ShardWriter,
                                 choose_dtype, shard_name)

PLAN = ".prepare-plan.json"
SHARD_FILE = re.compile(r"^(train|val)-(\d{5})\.(bin|idx|mask)$")


@dataclass(kw_only=True, slots=True)
class PrepareConfig:
    """Settings of ``hataori data prepare``."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The corpora to encode, in order (``--input`` adds to them)."""
    tokenizer: str = ""
    """The tokenizer: a folder holding tokenizer.model, or the .model file."""
    output: str = ""
    """The dataset folder to write."""
    workers: int = 1
    """Encoding processes; 1 encodes in the main process. Does not change the output."""
    batch_docs: int = 256
    """Documents handed to a worker at a time."""
    val_fraction: float = 0.005
    """Share of documents (by hash of their text) that go to the validation split."""
    val_docs: int = 0
    """If positive, exactly this many documents go to validation instead (one extra reading pass)."""
    split_seed: int = 0
    """Key of the split hash: another seed draws another validation set."""
    shard_tokens: int = 100_000_000
    """Largest number of tokens in one shard (a longer document gets a shard of its own)."""
    dtype: Literal["auto", "uint16", "uint32"] = "auto"
    """Token id type in the shards; auto takes uint16 when the vocabulary fits."""
    skip_bad_lines: bool = False
    """Count and skip malformed input lines instead of stopping at the first."""
    chat_template: str = ""
    """A chat template (a .jinja file, or a folder or tokenizer_config.json holding one): the inputs are
    conversations, encoded with loss masks (module docstring); empty: the inputs are plain text."""
    max_tokens: int = 2049
    """Conversations only: the most tokens of one, EOS included (the training seq_len + 1)."""
    overlong: Literal["drop", "truncate", "refuse"] = "drop"
    """Conversations only: what to do with one longer than max_tokens (hataori.data.chat)."""
    preference: bool = False
    """Conversations only: the inputs are preference pairs (prompt, chosen, rejected), each written as two
    documents, chosen then rejected, in the same split (hataori.data.chat)."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self):
        require(len(self.sources) > 0, "sources", "no input; pass --input PATH[:WEIGHT] or list sources in the config")
        require(bool(self.tokenizer), "tokenizer",
                "no tokenizer; pass --tokenizer DIR (from `hataori tokenizer train`)")
        require(bool(self.output), "output", "no output folder; pass --output DIR")
        require(self.workers >= 1, "workers", f"must be at least 1, got {self.workers}")
        require(self.batch_docs >= 1, "batch_docs", f"must be at least 1, got {self.batch_docs}")
        require(0.0 <= self.val_fraction < 1.0, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        require(self.val_docs >= 0, "val_docs", f"must be 0 (use val_fraction) or positive, got {self.val_docs}")
        require(self.shard_tokens >= 1, "shard_tokens", f"must be positive, got {self.shard_tokens}")
        require(self.max_tokens >= 2, "max_tokens", f"must be at least 2 (a token and EOS), got {self.max_tokens}")
        require(self.overlong in OVERLONG_RULES, "overlong", f"must be one of {', '.join(OVERLONG_RULES)}")
        require(self.chat_template or not self.preference, "preference",
                "preference pairs are conversations: give the chat template (--chat-template) too")

    def chat(self) -> tuple[str, int, str, bool] | None:
        """What the encoder needs for conversations (template, max_tokens, overlong, preference), or None."""
        return (self.chat_template, self.max_tokens, self.overlong, self.preference) if self.chat_template else None


# ----------------------------------------------------------------------------- encoding (worker side)

_ENCODER: "_Encoder | None" = None


@dataclass(slots=True)
class _Encoded:
    """One batch of texts encoded: concatenated ids (EOS after each document) and lengths. (A batch of
    conversations is a :class:`hataori.data.chat.EncodedConversations`, with masks and statuses too.)"""

    tokens: np.ndarray
    lengths: np.ndarray
    mask: None = None
    status: None = None


class _Encoder:
    """Turns a batch of texts (or conversations, given ``chat``: see PrepareConfig.chat) into :class:`_Encoded`."""

    def __init__(self, tokenizer_path: str, dtype: str, chat: tuple[str, int, str, bool] | None = None):
        self.tokenizer = Tokenizer(tokenizer_path)
        self.eos = self.tokenizer.eos_id
        self.dtype = np.dtype(dtype)
        self.conversations = None
        if chat is not None:
            template, max_tokens, overlong, preference = chat
            self.conversations = ConversationEncoder(self.tokenizer, check_template(template, self.tokenizer),
                                                     max_tokens, overlong, preference)

    def __call__(self, texts: list[str]) -> "_Encoded | EncodedConversations":
        if self.conversations is not None:
            return self.conversations(texts, self.dtype)
        # One thread: parallelism comes from worker processes, so `workers` is the CPU budget.
        ids = self.tokenizer.encode(texts, num_threads=1)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        eos = (self.eos,)
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, eos) for x in ids),
                           dtype=self.dtype, count=int(lengths.sum()))
        return _Encoded(flat, lengths)


def _init_worker(tokenizer_path: str, dtype: str, chat, parent: int) -> None:
    global _ENCODER
    _ENCODER = _Encoder(tokenizer_path, dtype, chat)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A killed main process cannot stop its workers; they notice it is gone and exit."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _encode_in_worker(texts: list[str]) -> "_Encoded | EncodedConversations":
    return _ENCODER(texts)


def _worker_pid(_: int) -> int:
    time.sleep(0.05)  # long enough that the other workers, not this one, take the other calls
    return os.getpid()


# ----------------------------------------------------------------------------- writing shards of one split


class _SplitWriter:
    """Appends documents to the shards of one split, starting a new shard when one is full."""

    def __init__(self, folder: Path, split: str, first_index: int, dtype: np.dtype, fingerprint: str,
                 shard_tokens: int, done: list[dict], masked: bool = False):
        self.folder, self.split, self.index = folder, split, first_index
        self.dtype, self.fingerprint, self.shard_tokens, self.masked = dtype, fingerprint, shard_tokens, masked
        self.shards = list(done)  # manifest entries of complete shards
        self.writer: ShardWriter | None = None

    def add(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        first, start = 0, 0
        while first < len(lengths):
            if self.writer is None:
                self.writer = ShardWriter(self.folder / shard_name(self.split, self.index), self.dtype,
                                          self.fingerprint, masked=self.masked)
            room = self.shard_tokens - self.writer.tokens
            ends = np.cumsum(lengths[first:])
            n = int(np.searchsorted(ends, room, side="right"))
            if n == 0 and self.writer.documents == 0:
                n = 1  # a document longer than a shard gets one of its own
            if n:
                end = start + int(ends[n - 1])
                self.writer.add(tokens[start:end], lengths[first:first + n], None if mask is None else mask[start:end])
                first, start = first + n, start + int(ends[n - 1])
            if first < len(lengths):  # the next document does not fit
                self._close()

    def _close(self) -> None:
        self.writer.close()
        entry = {"name": shard_name(self.split, self.index), "documents": self.writer.documents,
                 "tokens": self.writer.tokens, "max_id": self.writer.max_id}
        if self.masked:
            entry["loss_tokens"] = self.writer.loss_tokens
        self.shards.append(entry)
        self.writer, self.index = None, self.index + 1

    def finish(self) -> dict:
        if self.writer is not None and self.writer.documents:
            self._close()
        info = {"documents": sum(s["documents"] for s in self.shards),
                "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}
        if self.masked:
            info["loss_tokens"] = sum(s["loss_tokens"] for s in self.shards)
        return info

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# ----------------------------------------------------------------------------- reading and splitting


def _documents(cfg: PrepareConfig, files: list[tuple[int, Path]],
               stats: list[ReadStats]) -> Iterator[tuple[int, str, str]]:
    """``(source index, split text, document)`` of every document of every source, in order: for text the
    text twice; for conversations the messages (:func:`hataori.data.chat.split_text`) and the encoder's
    payload."""
    for s, path in files:
        if cfg.chat_template:
            for where, value in iter_conversations(path, cfg.skip_bad_lines, stats[s], cfg.preference):
                yield s, split_text(value), payload(where, value)
        else:
            yield from ((s, doc, doc) for doc in iter_documents(path, cfg.sources[s], cfg.skip_bad_lines, stats[s]))


def _val_limit(cfg: PrepareConfig, files: list[tuple[int, Path]]) -> int:
    """Documents whose split key is below this go to validation."""
    if cfg.val_docs == 0:
        return int(cfg.val_fraction * 2**64)
    smallest: list[int] = []  # max-heap (negated) of the val_docs smallest keys
    total = 0
    for _, text, _ in _documents(cfg, files, [ReadStats() for _ in cfg.sources]):
        key = split_key(text, cfg.split_seed)
        total += 1
        if len(smallest) < cfg.val_docs:
            heapq.heappush(smallest, -key)
        elif key < -smallest[0]:
            heapq.heapreplace(smallest, -key)
    if total <= cfg.val_docs:
        raise ConfigError("val_docs", f"asks for {cfg.val_docs} validation documents, but the inputs hold only "
                          f"{total}; lower it or use val_fraction")
    return -smallest[0] + 1


# ----------------------------------------------------------------------------- resuming


def _plan(cfg: PrepareConfig, tokenizer: Tokenizer, dtype: np.dtype, files: list[tuple[int, Path]]) -> dict:
    """Everything the output depends on; a partial output with another plan is started over."""
    settings = to_dict(cfg)
    for key in ("workers", "batch_docs", "progress", "output", "tokenizer"):
        settings.pop(key)
    if not cfg.chat_template:  # a text prepare's plan is what it was before conversations were read
        for key in ("chat_template", "max_tokens", "overlong", "preference"):
            settings.pop(key)
    inputs = [{"path": str(p), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns} for _, p in files]
    plan = {"format_version": MASKED_VERSION if cfg.chat_template else FORMAT_VERSION,
            "tokenizer": tokenizer.fingerprint, "dtype": dtype.name, "settings": settings, "inputs": inputs}
    if cfg.chat_template:
        plan["chat_template_sha256"] = check_template(cfg.chat_template, tokenizer).sha256
    return plan


def _shard_files(folder: Path) -> list[tuple[str, int, Path]]:
    found = []
    for path in folder.iterdir():
        m = SHARD_FILE.match(path.name)
        if m:
            found.append((m.group(1), int(m.group(2)), path))
    return found


def _complete_shards(folder: Path, split: str, dtype: np.dtype, fingerprint: str) -> list[dict]:
    """Manifest entries of the complete shards ``split-00000``, ``split-00001``, ... of an
    interrupted run; files of later or incomplete shards are removed."""
    done = []
    while True:
        stem = folder / shard_name(split, len(done))
        try:
            shard = Shard(stem, fingerprint)
        except (ShardError, HataoriError):
            break
        if shard.dtype != dtype:
            break
        done.append({"name": stem.name, "documents": shard.num_docs, "tokens": shard.num_tokens,
                     "max_id": shard.largest_id()})
    for file_split, index, path in _shard_files(folder):
        if file_split == split and index >= len(done):
            path.unlink()
    return done


def _start(folder: Path, plan: dict) -> None:
    """Make ``folder`` ready: remove temporary files, and shards of a run with another plan."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    plan_path = folder / PLAN
    old = json.loads(plan_path.read_text(encoding="utf-8")) if plan_path.is_file() else None
    if old != plan:
        stale = _shard_files(folder)
        if stale:
            print(f"{folder}: the shards there were made from other inputs or settings; starting over",
                  file=sys.stderr)
            for _, _, path in stale:
                path.unlink()
        atomic_write_text(plan_path, json.dumps(plan, indent=1, ensure_ascii=False))


# ----------------------------------------------------------------------------- the run


def prepare(cfg: PrepareConfig, replace: bool = False) -> dict:
    """Encode ``cfg.sources`` into a dataset folder; return its manifest.

    A folder already holding a dataset from the same inputs and settings is left as it is; one
    holding anything else (another dataset, other files) is refused unless ``replace``, and then
    replaced only once the new dataset is complete. A full disk leaves nothing behind.
    """
    tokenizer = Tokenizer(cfg.tokenizer)
    dtype = choose_dtype(tokenizer.vocab_size, cfg.dtype)
    files = [(s, path) for s, source in enumerate(cfg.sources) for path in expand(source)]
    folder = Path(cfg.output)
    plan = _plan(cfg, tokenizer, dtype, files)

    with claim(folder, "dataset", inputs=[cfg.tokenizer, *(path for _, path in files)]) as out:
        manifest_path = folder / MANIFEST
        interrupted = (folder / PLAN).is_file() and not manifest_path.is_file()
        if manifest_path.is_file():
            manifest, damage = read_manifest(manifest_path)
            if manifest is not None and manifest.get("plan") == plan:
                print(f"{folder}: already prepared from these inputs and settings; nothing to do", file=sys.stderr)
                return manifest
            if not replace:
                held = (f"a dataset whose {MANIFEST} is damaged ({damage})" if damage
                        else "a dataset prepared from other inputs or settings")
                raise HataoriError(f"{folder} already holds {held}; pass --replace to replace it once the new one is "
                                   "complete, or choose another --output")
        if not interrupted:  # an interrupted prepare is resumed in place; anything else must be a dataset
            out.check_replace(replace)
        val_limit = _val_limit(cfg, files)
        with disk_full_error(folder):
            if out.occupied and not interrupted:
                with out.folder() as staging:
                    return _encode(cfg, tokenizer, dtype, files, plan, val_limit, staging)
            out.mark()
            return _encode(cfg, tokenizer, dtype, files, plan, val_limit, folder)


def read_manifest(path: Path) -> tuple[dict | None, str | None]:
    """(an existing output's dataset.json, None), or (None, what is wrong with it)."""
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return None, str(err)
    return (manifest, None) if isinstance(manifest, dict) else (None, "not a JSON object")


def _encode(cfg: PrepareConfig, tokenizer: Tokenizer, dtype: np.dtype, files: list[tuple[int, Path]], plan: dict,
            val_limit: int, folder: Path) -> dict:
    """Write the shards and, last, the manifest into ``folder``, resuming what an interrupted run left."""
    writers: dict[str, _SplitWriter] = {}
    stats = [ReadStats() for _ in cfg.sources]
    per_source = [{split: 0 for split in SPLITS} for _ in cfg.sources]
    encoded = {"documents": 0, "tokens": 0, "text_bytes": 0, "chat": {split: EncodeCounts() for split in SPLITS}}
    try:
        _start(folder, plan)
        writers, skip = _open_writers(cfg, folder, dtype, tokenizer)
        startup = time.perf_counter()
        with _Pipeline(cfg, str(tokenizer.path), dtype) as pipeline, _progress(cfg, files) as bar:
            started = time.perf_counter()
            encoded["startup_seconds"] = round(started - startup, 3)
            batches = _Batches(pipeline, writers, bar, stats, cfg.batch_docs, encoded)
            seen = {split: 0 for split in SPLITS}
            for s, key, document in _documents(cfg, files, stats):
                split = "val" if split_key(key, cfg.split_seed) < val_limit else "train"
                per_source[s][split] += 1
                seen[split] += 1
                if seen[split] > skip[split]:  # the first skip[split] are in the interrupted run's shards
                    batches.add(document, split)
            batches.drain()
        splits_info = {split: writers[split].finish() for split in SPLITS}
        if splits_info["train"]["documents"] == 0:
            chat = encoded["chat"]["train"]
            dropped = (f" ({chat.dropped_overlong} conversations dropped over max_tokens={cfg.max_tokens}, "
                       f"{chat.dropped_no_loss} without a loss token left: see overlong and max_tokens)"
                       if cfg.chat_template else "")
            raise HataoriError(f"no documents went to the train split{dropped}; check the inputs and "
                               "val_fraction/val_docs")
        elapsed = time.perf_counter() - started
        manifest = _manifest(cfg, tokenizer, dtype, plan, files, splits_info, stats, per_source, encoded, elapsed)
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False))
    except BaseException as err:
        _abandon(folder, writers, err)
        raise
    (folder / PLAN).unlink(missing_ok=True)
    return manifest


def _open_writers(cfg: PrepareConfig, folder: Path, dtype: np.dtype,
                  tokenizer: Tokenizer) -> tuple[dict[str, "_SplitWriter"], dict[str, int]]:
    """Each split's shard writer, after the shards an interrupted run completed, and how many of the
    split's documents those shards hold (the documents to skip)."""
    writers = {}
    if cfg.chat_template:  # conversations start over (module docstring)
        for _, _, path in _shard_files(folder):
            path.unlink()
    for split in SPLITS:
        done = _complete_shards(folder, split, dtype, tokenizer.fingerprint)
        writers[split] = _SplitWriter(folder, split, len(done), dtype, tokenizer.fingerprint, cfg.shard_tokens, done,
                                      masked=bool(cfg.chat_template))
    skip = {split: sum(s["documents"] for s in writers[split].shards) for split in SPLITS}
    if any(skip.values()):
        print(f"{folder}: resuming; " + ", ".join(f"{len(writers[s].shards)} {s} shards ({skip[s]} documents)"
                                                 for s in SPLITS) + " already complete", file=sys.stderr)
    return writers, skip


def _abandon(folder: Path, writers: dict[str, "_SplitWriter"], err: BaseException) -> None:
    """After a failure: drop the shards being written, and everything when nothing is worth resuming
    (a full disk, or no complete train shard)."""
    for writer in writers.values():
        writer.abort()
    if disk_full(err) is not None or "train" not in writers or not writers["train"].shards:
        for _, _, path in _shard_files(folder) if folder.is_dir() else ():
            path.unlink()
        (folder / PLAN).unlink(missing_ok=True)
        if folder.is_dir() and all(p.name == MARKER for p in folder.iterdir()):
            (folder / MARKER).unlink(missing_ok=True)
            folder.rmdir()


class _Batches:
    """Documents gathered into batches of ``batch_docs`` for the encoding pipeline; what comes back
    encoded is written to the splits' shards as it arrives, and the progress bar follows the bytes read."""

    def __init__(self, pipeline: "_Pipeline", writers: dict[str, "_SplitWriter"], bar, stats: list[ReadStats],
                 batch_docs: int, encoded: dict[str, Any]):
        self.pipeline, self.writers, self.bar, self.stats = pipeline, writers, bar, stats
        self.batch_docs, self.encoded = batch_docs, encoded
        self.texts: list[str] = []
        self.splits: list[str] = []
        self.read_bytes = 0

    def add(self, text: str, split: str) -> None:
        self.encoded["text_bytes"] += len(text.encode("utf-8"))
        self.texts.append(text)
        self.splits.append(split)
        if len(self.texts) >= self.batch_docs:
            self.submit()

    def submit(self) -> None:
        """Hand the gathered documents to the pipeline and write whatever it has finished."""
        if self.texts:
            self.pipeline.submit(self.texts, self.splits)
            self.encoded["documents"] += len(self.texts)
            self.texts, self.splits = [], []
        self._write(self.pipeline.ready())
        total_read = sum(st.bytes for st in self.stats)
        self.bar.update(total_read - self.read_bytes)
        self.read_bytes = total_read

    def drain(self) -> None:
        """Submit the last documents and write everything still in the pipeline."""
        self.submit()
        self._write(self.pipeline.drain())

    def _write(self, results) -> None:
        for batch, doc_splits in results:
            if batch.status is not None:  # conversations: count them by split, and route only the kept ones
                splits = np.array(doc_splits)
                kept_splits = np.repeat(splits[batch.kept], batch.per_input)  # a pair is two documents
                for split in SPLITS:
                    mine = splits == split
                    self.encoded["chat"][split].add(batch.status[mine], batch.lengths[kept_splits == split],
                                                    batch.loss[mine], [batch.notes[i] for i in sorted(batch.notes)
                                                                       if mine[i]])
                doc_splits = kept_splits.tolist()
            self.encoded["tokens"] += _write(self.writers, batch, doc_splits)


def _write(writers: dict, batch: "_Encoded", doc_splits: list[str]) -> int:
    """Route a batch's documents to their splits' shards, keeping their order; return its tokens."""
    tokens, lengths, mask = batch.tokens, batch.lengths, batch.mask
    is_val = np.array([s == "val" for s in doc_splits], dtype=bool)
    if not is_val.any():
        if len(lengths):
            writers["train"].add(tokens, lengths, mask)
        return len(tokens)
    token_is_val = np.repeat(is_val, lengths)
    for split, doc_mask, token_mask in (("train", ~is_val, ~token_is_val), ("val", is_val, token_is_val)):
        if doc_mask.any():
            writers[split].add(tokens[token_mask], lengths[doc_mask], None if mask is None else mask[token_mask])
    return len(tokens)


class _Pipeline:
    """Batches of texts in, encoded batches out in submission order; a bounded number in flight."""

    def __init__(self, cfg: PrepareConfig, tokenizer_path: str, dtype: np.dtype):
        self.pending: deque = deque()
        self.local = None
        self.pool = None
        if cfg.workers == 1:
            self.local = _Encoder(tokenizer_path, dtype.str, cfg.chat())
        else:
            context = multiprocessing.get_context("spawn")
            self.pool = cf.ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_init_worker,
                                               initargs=(tokenizer_path, dtype.str, cfg.chat(), os.getpid()))
            self._wait_for_workers(cfg.workers)
        self.max_pending = 2 * cfg.workers + 2

    def _wait_for_workers(self, workers: int) -> None:
        """Start every worker (each loads the tokenizer) before the clock starts."""
        pids: set[int] = set()
        for _ in range(10):
            pids.update(self.pool.map(_worker_pid, range(workers)))
            if len(pids) == workers:
                return

    def submit(self, texts: list[str], splits: list[str]) -> None:
        if self.local is not None:
            self.pending.append((self.local(texts), splits))
        else:
            self.pending.append((self.pool.submit(_encode_in_worker, texts), splits))

    def _pop(self):
        result, splits = self.pending.popleft()
        return (result if self.local is not None else result.result()), splits

    def ready(self):
        """Encoded batches that are done (or must be waited for to bound memory), oldest first."""
        while self.pending and (len(self.pending) >= self.max_pending or self.local is not None
                                or self.pending[0][0].done()):
            yield self._pop()

    def drain(self):
        while self.pending:
            yield self._pop()

    def __enter__(self) -> "_Pipeline":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _progress(cfg: PrepareConfig, files: list[tuple[int, Path]]):
    from tqdm import tqdm

    compressed = any(p.name.endswith((".gz", ".zst")) for _, p in files)
    total = None if compressed else sum(p.stat().st_size for _, p in files)
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="encoding", file=sys.stderr,
                disable=not cfg.progress, dynamic_ncols=True)


def _manifest(cfg, tokenizer, dtype, plan, files, splits_info, stats, per_source, encoded, elapsed) -> dict:
    sources = []
    for s, source in enumerate(cfg.sources):
        sources.append({"name": source.name, "path": source.path, "weight": source.weight,
                        "files": [str(p) for i, p in files if i == s], "documents": per_source[s],
                        "skipped_lines": stats[s].skipped, "skipped_examples": stats[s].skipped_examples})
    seconds = max(elapsed, 1e-9)
    run = {"seconds": round(elapsed, 3), "startup_seconds": encoded["startup_seconds"], "workers": cfg.workers,
           "encoded_documents": encoded["documents"],
           "encoded_tokens": encoded["tokens"], "encoded_text_bytes": encoded["text_bytes"],
           "text_mb_per_s": round(encoded["text_bytes"] / 1e6 / seconds, 3),
           "tokens_per_s": round(encoded["tokens"] / seconds), "documents_per_s": round(encoded["documents"] / seconds)}
    config = to_dict(cfg)
    manifest = {"format_version": MASKED_VERSION if cfg.chat_template else FORMAT_VERSION, "dtype": dtype.name,
                "tokenizer": {"path": str(tokenizer.path.resolve()), "fingerprint": tokenizer.fingerprint,
                              "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
                "sources": sources, "splits": splits_info, "config": config, "plan": plan, "last_run": run}
    if not cfg.chat_template:
        for key in ("chat_template", "max_tokens", "overlong", "preference"):
            config.pop(key)
        return manifest
    template = check_template(cfg.chat_template, tokenizer)
    counts = {split: encoded["chat"][split].as_dict() for split in SPLITS}
    for split, info in counts.items():  # packing efficiency's ceiling: the share of tokens that carry a loss
        info["loss_share"] = round(info["loss_tokens"] / max(info["tokens"], 1), 4)
    manifest["chat"] = {"kind": "preference" if cfg.preference else "conversations",
                        "template": {"path": str(Path(cfg.chat_template).resolve()), "sha256": template.sha256,
                                     "source": template.source},
                        "max_tokens": cfg.max_tokens, "overlong": cfg.overlong, "splits": counts}
    return manifest


def report(manifest: dict) -> str:
    """A short human summary of a prepare: counts and the last run's throughput."""
    lines = []
    for split, info in manifest["splits"].items():
        lines.append(f"{split}: {info['documents']} documents, {info['tokens']} tokens, {len(info['shards'])} shards")
    skipped = sum(s["skipped_lines"] for s in manifest["sources"])
    if skipped:
        examples = [e for s in manifest["sources"] for e in s["skipped_examples"]][:3]
        lines.append(f"skipped {skipped} bad lines, e.g. " + "; ".join(examples))
    unit = "preference pairs" if manifest.get("chat", {}).get("kind") == "preference" else "conversations"
    for split, info in manifest.get("chat", {}).get("splits", {}).items():
        lines.append(f"{split} {unit}: {info['examples']} kept ({info['truncated']} truncated), "
                     f"{info['dropped_overlong']} dropped over max_tokens={manifest['chat']['max_tokens']}, "
                     f"{info['dropped_no_loss']} without a loss token; {info['loss_tokens']} of {info['tokens']} "
                     f"tokens carry the loss ({info['loss_share']:.1%}), longest {info['longest']}")
        if info["dropped_examples"]:
            lines.append("  e.g. " + "; ".join(info["dropped_examples"][:3]))
    run = manifest["last_run"]
    lines.append(f"encoded {run['encoded_documents']} documents ({run['encoded_text_bytes'] / 1e6:.2f} MB of text, "
                 f"{run['encoded_tokens']} tokens) in {run['seconds']:.2f} s with {run['workers']} workers "
                 f"(started in {run['startup_seconds']:.2f} s, not counted): "
                 f"{run['text_mb_per_s']:.2f} MB/s, {run['tokens_per_s']} tokens/s, "
                 f"{run['documents_per_s']} documents/s")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="*", metavar="CONFIG|key=value",
                        help="YAML presets (applied in order), then overrides such as shard_tokens=50000000")
    parser.add_argument("--input", action="append", default=[], metavar="PATH[:WEIGHT]",
                        help="a corpus file, glob or folder (repeatable); replaces the config's sources")
    parser.add_argument("--tokenizer", help="tokenizer folder or .model file")
    parser.add_argument("--output", help="dataset folder to write")
    parser.add_argument("--workers", type=int, help="encoding processes (default 1)")
    parser.add_argument("--chat-template", metavar="TEMPLATE", help="the inputs are conversations (messages, or prompt "
                        "and completion), rendered with this chat template (configs/chat/ja-chatml.jinja) and "
                        "written with loss masks")
    parser.add_argument("--replace", action="store_true",
                        help="replace an output folder that holds another dataset or other files (once the new "
                             "dataset is complete)")


def config_from_args(args: argparse.Namespace) -> PrepareConfig:
    files, overrides = command_items(args.config, {
        "--input": ("sources", [parse_source(i) for i in args.input] if args.input else None),
        **{f"--{key}": (key, getattr(args, key)) for key in ("tokenizer", "output", "workers")},
        "--chat-template": ("chat_template", args.chat_template)})
    return load(PrepareConfig, files, overrides)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    manifest = prepare(cfg, replace=args.replace)
    print(report(manifest))
    return 0
