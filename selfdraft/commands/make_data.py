"""``ctxdraft make-data``: a training corpus the models write themselves.

Queries (Magpie, Xu et al. 2024, arXiv 2406.08464): an aligned chat model given only its chat template's
*pre-query prefix* (the system turn, then the tokens that open a user turn) writes a user query by itself. A
short system prompt and a few seed words per domain steer the mix (chat, question answering, maths,
translation, summarisation of a text the model writes first, questions over a passage it writes); no
benchmark prompt is ever used. Answers: the TARGET's own continuations of each query under its chat template
(greedy by default), which is what its draft heads must learn to predict (Medusa-2's self-distillation).

Generation is batched (``batch_size`` rows per forward, left-padded) and deterministic per batch: batch ``b``
draws its domains, seed words and sampling noise from (``seed``, ``b``) alone. Each batch's kept rows are
appended in one locked write (``fileio.append_lines``), so a killed run leaves whole batches; ``resume``
reads them back, rebuilds the near-duplicate index from them and continues at the next batch, giving exactly
the rows an uninterrupted run gives. A key file beside the output (``.NAME.make_data.json``) refuses a
resume with other models or settings.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..base import checks
from ..base.errors import CtxdraftError
from ..base.fileio import append_lines, display_path, read_json, write_json_atomic
from ..base.text_filters import NearDuplicates, degenerate
from ..runtime.target import DEFAULT_TARGET, load_target

Progress = Callable[[str, int, int], None]  # (stage, done, total)
MARKER = "CTXDRAFTQUERYMARKER"
MAX_BARREN = 50  # batches in a row without a kept row: the models write nothing usable, stop


@dataclass(frozen=True)
class Steer:
    """How one domain's queries are steered: a system prompt and words the user's turn starts with."""

    system: str
    seeds: tuple[str, ...] = ("",)


DOMAINS: dict[str, Steer] = {
    "chat": Steer("You are a friendly assistant. Users chat with you about their day, hobbies, plans and opinions.",
                  ("", "I", "Can you", "What do you think", "Tell me")),
    "qa": Steer("You are a knowledgeable assistant. Users ask you factual questions about science, history, "
                "geography and everyday life.", ("What", "Why", "How", "Who", "When", "Explain")),
    "math": Steer("You are a maths tutor. Users ask you arithmetic, algebra and word problems to solve step by step.",
                  ("Solve", "Calculate", "If", "What is", "A train", "How many")),
    "translation": Steer("You are a translator. Users ask you to translate sentences between English, French, "
                         "Spanish and German.", ("Translate", "How do you say", "Translate into French:",
                                                 "Translate into Spanish:")),
    "summarization": Steer("You are an editor. Users paste a paragraph they wrote and ask for a short summary.",
                           ("Summarize the following text:\n\n", "Give a one-sentence summary of this paragraph:\n\n")),
    "retrieval": Steer("You are a reading assistant. Users paste a passage and ask a question that the passage answers.",
                       ("Read the passage and answer the question at the end.\n\nPassage: ",
                        "Based on the text below, answer my question.\n\n")),
}


@dataclass
class MakeDataConfig:
    rows: int = 1000  # rows the output file should hold
    batch_size: int = 16  # rows per forward
    domains: list[str] = field(default_factory=lambda: list(DOMAINS))
    max_query_tokens: int = 96
    max_answer_tokens: int = 128
    query_temperature: float = 1.0
    query_top_p: float = 0.95
    answer_temperature: float = 0.0  # 0: greedy
    dedup_threshold: float = 0.7  # Jaccard of word 3-grams at which a query is a near-duplicate
    min_query_words: int = 3
    seed: int = 0
    time_limit: float | None = None  # seconds; no new batch starts after this
    resume: bool = False

    def validate(self) -> None:
        checks.integer("--rows", self.rows, minimum=1)
        checks.integer("--batch-size", self.batch_size, minimum=1)
        checks.integer("--max-query-tokens", self.max_query_tokens, minimum=1)
        checks.integer("--max-answer-tokens", self.max_answer_tokens, minimum=1)
        checks.number("--query-temperature", self.query_temperature, minimum=0.0)
        checks.number("--query-top-p", self.query_top_p, above=0.0, maximum=1.0)
        checks.number("--answer-temperature", self.answer_temperature, minimum=0.0)
        checks.number("--dedup-threshold", self.dedup_threshold, above=0.0, maximum=1.0)
        checks.integer("--seed", self.seed)
        checks.integer("--min-query-words", self.min_query_words, minimum=1)
        if self.time_limit is not None:
            checks.number("--time-limit", self.time_limit, above=0.0)
        if not self.domains:
            raise CtxdraftError(f"--domains is empty; give some of {', '.join(DOMAINS)}")
        unknown = [d for d in self.domains if d not in DOMAINS]
        if unknown:
            raise CtxdraftError(f"--domains: unknown domain(s) {', '.join(unknown)}; known: {', '.join(DOMAINS)}")

    def key(self) -> dict:
        """What the rows depend on (not how many are wanted, nor for how long a run may go)."""
        return {k: v for k, v in asdict(self).items() if k not in ("rows", "time_limit", "resume")}


def pre_query_prefix(tokenizer, model_name: str, system: str) -> tuple[str, str]:
    """The chat template's text before a user's query (system turn included) and the text right after it (whose
    first token ends the query). A template without a usable place for the query is an error naming the model."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise CtxdraftError(f"{model_name} has no chat template, so it has no pre-query prefix to write queries from; "
                            "give a chat (instruct) model with --writer")
    try:
        rendered = tokenizer.apply_chat_template([{"role": "system", "content": system},
                                                  {"role": "user", "content": MARKER}], tokenize=False)
    except Exception as e:  # a template's own error (jinja raises several kinds, e.g. "system role not supported")
        raise CtxdraftError(f"{model_name}: its chat template cannot render a system and a user turn ({e})") from None
    if rendered.count(MARKER) != 1 or not rendered.split(MARKER)[0]:
        raise CtxdraftError(f"{model_name}: its chat template has no usable pre-query prefix (the user's text does not "
                            "appear once, after some template text); give another model with --writer")
    before, after = rendered.split(MARKER)
    return before, after


def _turn_end_ids(tokenizer, after: str, eos_ids: set[int]) -> list[int]:
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return sorted(set(eos_ids) | ({ids[0]} if ids else set()))


@torch.inference_mode()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                   temperature: float, top_p: float = 1.0) -> list[tuple[list[int], bool]]:
    """Continue every prompt in one left-padded batch; per row the new ids up to (not including) the first stop
    id, and whether a stop id ended it. ``temperature`` 0 is greedy."""
    from transformers import GenerationConfig

    B, T = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id, **sampling)
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)  # [B, T + new]
    results = []
    stops = set(stop_ids)
    for row in out[:, T:].tolist():
        end = next((j for j, t in enumerate(row) if t in stops), None)
        results.append((row[:end], True) if end is not None else (row, False))
    return results


@dataclass
class Counts:
    """Rows dropped by each filter (this run)."""

    short_query: int = 0  # fewer than min_query_words words
    repetitive_query: int = 0
    duplicate_query: int = 0
    empty_answer: int = 0
    repetitive_answer: int = 0


def _read_done(out: Path) -> list[dict]:
    """The rows already in ``out``; a last line cut short by a kill is removed (its batch is made again), any
    other damage is an error that changes nothing."""
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(out, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows = []
    for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("batch"), int) and isinstance(row.get("prompt"), str)):
            raise CtxdraftError(f"{display_path(out)}, line {lineno}: not a make-data row; the corpus is damaged. "
                                "Repair or remove that line, or write to a new file")
        rows.append(row)
    return rows


def _key_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.make_data.json")


def _check_resume(out: Path, key: str, resume: bool) -> list[dict]:
    key_file = _key_path(out)
    if out.exists() and out.stat().st_size > 0:
        if not resume:
            raise CtxdraftError(f"{display_path(out)} exists; give --resume to continue it, or another --out")
        found = read_json(key_file, "make-data key file") if key_file.is_file() else None
        if not isinstance(found, dict) or found.get("key") != key:
            raise CtxdraftError(f"{display_path(out)} was made by other models or settings (or not by make-data); "
                                "resume it with the same ones, or write to another --out")
        return _read_done(out)
    write_json_atomic(key_file, {"key": key})
    return []


def make_data(target, writer, out: str | os.PathLike, config: MakeDataConfig, progress: Progress | None = None) -> dict:
    """Write ``config.rows`` rows ``{"id", "batch", "domain", "prompt", "text", "answer_tokens", "ended"}`` to the
    JSONL file ``out``: queries written by ``writer`` (a loaded target; may be ``target`` itself), answers by
    ``target``. Returns the summary (rows, tokens, tokens/s, filtered counts)."""
    config.validate()
    out = Path(out)
    if out.is_dir():
        raise CtxdraftError(f"--out {display_path(out)} is a directory; give a .jsonl file name")
    if not out.parent.is_dir():
        raise CtxdraftError(f"the directory of --out {display_path(out)} does not exist; create it first")
    steer = {d: pre_query_prefix(writer.tokenizer, writer.name, DOMAINS[d].system) for d in config.domains}
    key = hashlib.sha256(json.dumps([target.content_hash, writer.content_hash, config.key()]).encode()).hexdigest()[:16]
    done = _check_resume(out, key, config.resume)
    seen = NearDuplicates(config.dedup_threshold)
    for row in done:
        seen.add(row["prompt"])
    num_rows = len(done)
    batch = max((row["batch"] for row in done), default=-1) + 1
    query_stop = {d: _turn_end_ids(writer.tokenizer, after, writer.eos_ids) for d, (_, after) in steer.items()}
    pad_w, pad_t = min(writer.eos_ids or {0}), min(target.eos_ids or {0})
    counts, new_rows, query_tokens, answer_tokens, barren = Counts(), 0, 0, 0, 0
    t0 = time.perf_counter()
    while num_rows < config.rows and (config.time_limit is None or time.perf_counter() - t0 < config.time_limit):
        rng = random.Random(f"make-data:{config.seed}:{batch}")
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{config.seed}:{batch}".encode()).digest()[:8], "little"))
        domains = [config.domains[(batch * config.batch_size + i) % len(config.domains)] for i in range(config.batch_size)]
        starts = [rng.choice(DOMAINS[d].seeds) for d in domains]
        prefixes = [writer.tokenizer(steer[d][0] + s, add_special_tokens=False)["input_ids"] for d, s in zip(domains, starts)]
        stop = sorted(set().union(*(query_stop[d] for d in set(domains))))
        written = generate_batch(writer.model, prefixes, config.max_query_tokens, stop, pad_w, config.query_temperature,
                                 config.query_top_p)
        local = NearDuplicates(config.dedup_threshold)
        candidates = []
        for i, ((ids, _), start) in enumerate(zip(written, starts)):
            query_tokens += len(ids)
            query = (start + writer.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            if len(query.split()) < config.min_query_words:
                counts.short_query += 1
            elif degenerate(ids):
                counts.repetitive_query += 1
            elif seen.is_duplicate(query) or local.check_add(query):
                counts.duplicate_query += 1
            else:
                candidates.append((i, query))
        kept = []
        if candidates:
            answers = generate_batch(target.model, [target.encode(q, chat=True) for _, q in candidates],
                                     config.max_answer_tokens, sorted(target.eos_ids), pad_t, config.answer_temperature)
            for (i, query), (ids, ended) in zip(candidates, answers):
                answer_tokens += len(ids)
                text = target.tokenizer.decode(ids, skip_special_tokens=True)
                if not text.strip():
                    counts.empty_answer += 1
                elif degenerate(ids):
                    counts.repetitive_answer += 1
                else:
                    kept.append({"id": f"md-{batch}-{i}", "batch": batch, "domain": domains[i], "prompt": query,
                                 "text": text, "answer_tokens": len(ids), "ended": ended})
        kept = kept[: config.rows - num_rows]
        append_lines(out, kept)
        for row in kept:
            seen.add(row["prompt"])
        num_rows += len(kept)
        new_rows += len(kept)
        batch += 1
        barren = 0 if kept else barren + 1
        if barren == MAX_BARREN:
            raise CtxdraftError(f"{MAX_BARREN} batches in a row kept no row (filtered: {asdict(counts)}); the writer "
                                f"({writer.name}) does not write usable queries with these settings")
        if progress:
            progress("make-data", num_rows, config.rows)
    elapsed = time.perf_counter() - t0
    generated = query_tokens + answer_tokens
    return {"out": display_path(out), "rows": num_rows, "new_rows": new_rows, "resumed_rows": len(done),
            "batches": batch, "complete": num_rows >= config.rows, "query_tokens": query_tokens,
            "answer_tokens": answer_tokens, "tokens_per_s": round(generated / elapsed, 1) if elapsed > 0 else None,
            "elapsed_s": round(elapsed, 1), "filtered": asdict(counts), "target": target.name, "writer": writer.name,
            "dtype": str(target.dtype).replace("torch.", "")}


def make_data_from_specs(out: str | os.PathLike, config: MakeDataConfig, *, target: str | None = None,
                         writer: str | None = None, dtype: str = "auto", threads: int | None = None,
                         progress: Progress | None = None) -> dict:
    """What ``ctxdraft make-data`` does: check the settings, load the target (the embedded default when None) and
    the query writer (the target itself when None) and run ``make_data`` with ``threads`` torch threads (default:
    torch's; on a busy shared CPU 1 thread avoids spin-waiting: 6x faster at batch 16 on the 2-core machine)."""
    config.validate()
    if threads is not None:
        checks.integer("--threads", threads, minimum=1)
    loaded = load_target(target or DEFAULT_TARGET, dtype=dtype)
    query_writer = loaded if writer is None or writer == (target or DEFAULT_TARGET) else load_target(writer, dtype=dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        summary = make_data(loaded, query_writer, out, config, progress)
    finally:
        torch.set_num_threads(before)
    return dict(summary, torch_threads=threads or before)
