"""Extractive-QA items: facts-world passages (counterfactual, and silent on the asked fact) and
SQuAD-format JSON, as left-padded batches with per-token sentence ids.

Every item is ``[bos] Passage : s_1 . ... s_k . Question : <question>`` and its answer is the next
token. ``sentence_spans`` index ``ids``; ``gold`` is the sentence holding the answer (-1: the
passage is silent on the asked fact and the answer must come from the model's memory).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from jaxinterp.experiments.common import UsageError
from jaxinterp.experiments.data.facts_world import PASSAGE_WORD, QUESTION_WORD

__all__ = ["QAItem", "Batch", "counterfactual_items", "silent_items", "read_squad", "load_squad", "batch",
           "split_sentences"]


@dataclasses.dataclass(frozen=True)
class QAItem:
    """One question. ``answer_id``: the extractive answer's (first) token (the true fact for a silent
    passage); ``memory_id``: the model's parametric answer (facts world) or -1 (unknown);
    ``corrupt_context`` / ``corrupt_question``: the same ids with the answer token in the passage /
    the question's subject replaced (same length), or None when the item has none."""

    ids: tuple
    answer_id: int
    memory_id: int
    sentence_spans: tuple
    gold: int
    kind: str                              # "counterfactual" | "silent" | "data"
    corrupt_context: Optional[tuple] = None
    corrupt_question: Optional[tuple] = None
    record: str = ""


@dataclasses.dataclass(frozen=True)
class Batch:
    """Left-padded arrays: ``tokens``/``mask``/``sentence_ids [B, T]`` and ``[B]`` per-item fields."""

    tokens: np.ndarray
    mask: np.ndarray
    sentence_ids: np.ndarray
    answer: np.ndarray
    memory: np.ndarray
    gold: np.ndarray
    n_sentences: int
    corrupt_context: Optional[np.ndarray]
    corrupt_question: Optional[np.ndarray]


def _pad(rows: Sequence[Sequence[int]], t: int, pad_id: int) -> np.ndarray:
    return np.asarray([[pad_id] * (t - len(r)) + list(r) for r in rows], np.int32)


def batch(items: Sequence[QAItem], pad_id: int) -> Batch:
    """Left-pad ``items`` into one ``Batch`` (corruptions only when every item has them)."""
    if not items:
        raise UsageError("no QA items to batch")
    t = max(len(i.ids) for i in items)
    sent = np.full((len(items), t), -1, np.int32)
    for b, item in enumerate(items):
        off = t - len(item.ids)
        for j, (s, e) in enumerate(item.sentence_spans):
            sent[b, off + s: off + e] = j
    ctx = [i.corrupt_context for i in items]
    qst = [i.corrupt_question for i in items]
    return Batch(
        tokens=_pad([i.ids for i in items], t, pad_id),
        mask=_pad([[1] * len(i.ids) for i in items], t, 0).astype(bool),
        sentence_ids=sent,
        answer=np.asarray([i.answer_id for i in items], np.int32),
        memory=np.asarray([i.memory_id for i in items], np.int32),
        gold=np.asarray([i.gold for i in items], np.int32),
        n_sentences=max(len(i.sentence_spans) for i in items),
        corrupt_context=None if any(c is None for c in ctx) else _pad(ctx, t, pad_id),
        corrupt_question=None if any(c is None for c in qst) else _pad(qst, t, pad_id),
    )


# ----------------------------------------------------------------------------- facts world


def _other_object(world, relation: str, avoid: set, rng) -> int:
    options = [o for o in world.relation(relation).objects if world.encode(o)[0] not in avoid]
    return world.encode(str(options[rng.integers(len(options))]))[0]


def counterfactual_items(world, n: int, seed: int = 0) -> list[QAItem]:
    """Passages stating a fact that contradicts the world, asked about that fact (context answer);
    the context corruption swaps the stated object for a third object of the relation."""
    rng = np.random.default_rng([seed, 1])
    out = []
    for p in world.context_passages(n, seed=seed, counterfactual=True):
        true_id = world.encode(world.entity(p.subject).attributes[p.relation])[0]
        ids = list(p.ids)
        bad = list(ids)
        bad[p.answer_position] = _other_object(world, p.relation, {p.answer_id, true_id}, rng)
        out.append(QAItem(tuple(ids), p.answer_id, true_id, p.sentence_spans, p.answer_sentence, "counterfactual",
                          corrupt_context=tuple(bad)))
    return out


def silent_items(world, n: int, seed: int = 0) -> list[QAItem]:
    """Passages that never mention the asked subject (memory answer: the true fact). The question asks
    a shared relation; its corruption swaps the subject for one with the same name length and
    another object (also absent from the passage)."""
    rng = np.random.default_rng([seed, 2])
    shared = [r.name for r in world.relations if r.domain == "shared"]
    q_len = len(world.encode(QUESTION_WORD))
    out = []
    for p in world.context_passages(n, seed=seed + 1000, counterfactual=False):
        start = p.subject_span[0] - 1
        while list(p.ids[start: start + q_len]) != world.encode(QUESTION_WORD):
            start -= 1
        head = list(p.ids[: start + q_len])
        text = " " + p.text + " "
        absent = [e for e in world.entities if f" {e.name} " not in text]
        for _ in range(100):
            e = absent[rng.integers(len(absent))]
            rel = shared[rng.integers(len(shared))]
            alts = [a for a in absent if len(a.name.split()) == len(e.name.split())
                    and a.attributes[rel] != e.attributes[rel]]
            if alts:
                break
        else:  # pragma: no cover - the world has many same-length names
            raise UsageError("no same-length alternative subject for a silent passage")
        alt = alts[rng.integers(len(alts))]
        t = int(rng.integers(len(world.relation(rel).templates)))
        q, q_bad = world.prompt(e.name, rel, t), world.prompt(alt.name, rel, t)
        out.append(QAItem(tuple(head + list(q.ids[1:])), q.answer_id, q.answer_id, p.sentence_spans, -1, "silent",
                          corrupt_question=tuple(head + list(q_bad.ids[1:]))))
    return out


# ----------------------------------------------------------------------------- SQuAD-format JSON


def split_sentences(context: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of ``context`` (split after . ! ? + space)."""
    spans, start = [], 0
    for m in re.finditer(r"(?<=[.!?])\s+", context):
        if context[start: m.start()].strip():
            spans.append((start, m.start()))
        start = m.end()
    if context[start:].strip():
        spans.append((start, len(context.rstrip())))
    return spans


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise UsageError(f"{where}: {what}")


def _records(data, path: str):
    """Yield ``(where, qid, context, question, answer_text, answer_start)``; schema errors name the record."""
    _need(isinstance(data, dict) and isinstance(data.get("data"), list), path,
          'not SQuAD format: expected {"data": [{"paragraphs": [{"context": str, "qas": [...]}]}]}')
    for i, article in enumerate(data["data"]):
        _need(isinstance(article, dict) and isinstance(article.get("paragraphs"), list), f"{path}: data[{i}]",
              'expected an object with a "paragraphs" list')
        for j, para in enumerate(article["paragraphs"]):
            where = f"{path}: data[{i}].paragraphs[{j}]"
            _need(isinstance(para, dict) and isinstance(para.get("context"), str) and isinstance(para.get("qas"), list),
                  where, 'expected an object with "context" (string) and "qas" (list)')
            for k, qa in enumerate(para["qas"]):
                qid = qa.get("id", f"#{k}") if isinstance(qa, dict) else f"#{k}"
                rec = f"{where}.qas[{k}] (id {qid!r})"
                _need(isinstance(qa, dict) and isinstance(qa.get("question"), str), rec, 'expected a "question" string')
                answers = qa.get("answers")
                _need(isinstance(answers, list) and answers and isinstance(answers[0], dict)
                      and isinstance(answers[0].get("text"), str) and isinstance(answers[0].get("answer_start"), int),
                      rec, 'expected "answers": [{"text": str, "answer_start": int}, ...]')
                text, start = answers[0]["text"], answers[0]["answer_start"]
                _need(bool(text.strip()) and para["context"][start: start + len(text)] == text, rec,
                      f"answer {text!r} is not in the passage at answer_start {start}")
                yield rec, str(qid), para["context"], qa["question"], text, start


def _encode_item(encode: Callable[[str], list], bos_id: Optional[int], context: str, question: str, answer: str,
                 start: int, rec: str) -> QAItem:
    spans = split_sentences(context)
    ids, token_spans, gold = ([] if bos_id is None else [bos_id]) + encode(PASSAGE_WORD), [], -1
    for j, (a, b) in enumerate(spans):
        piece = encode(" " + context[a:b])
        token_spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
        if a <= start < b:
            gold = j
    answer_ids = encode(" " + answer)
    _need(bool(answer_ids), rec, f"answer {answer!r} encodes to no tokens")
    ids += encode(" " + QUESTION_WORD) + encode(" " + question)
    g0, g1 = token_spans[gold]
    hits = [i for i in range(g0, g1) if ids[i] == answer_ids[0]]
    bad = None
    if hits:
        bad = list(ids)
        for i in hits:
            bad[i] = -1  # filled with another record's answer token by load_squad
    return QAItem(tuple(ids), answer_ids[0], -1, tuple(token_spans), gold, "data",
                  corrupt_context=None if bad is None else tuple(bad), record=rec)


def read_squad(path: str) -> list[tuple]:
    """The checked records ``(where, id, context, question, answer_text, answer_start)`` of a SQuAD-format
    JSON file (first answer of each question). A wrong schema or an answer span missing from its passage
    is a one-line ``UsageError`` naming the record."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read --data {path}: {e}") from None
    records = list(_records(data, str(path)))
    _need(bool(records), str(path), "no questions in the file")
    return records


def load_squad(path: str, encode: Callable[[str], list], bos_id: Optional[int], limit: Optional[int] = None,
               records: Optional[list] = None) -> list[QAItem]:
    """QA items of a SQuAD-format JSON file (``read_squad``'s records, or ``records`` already read). The
    context corruption replaces the answer's token in its sentence with the next record's (other) answer token."""
    records = read_squad(path) if records is None else records
    items = [_encode_item(encode, bos_id, ctx, q, a, s, rec) for rec, _, ctx, q, a, s in records[:limit]]
    out = []
    for n, item in enumerate(items):
        other = [o.answer_id for o in items[n + 1:] + items[:n] if o.answer_id != item.answer_id]
        bad = item.corrupt_context
        if bad is not None:
            bad = tuple(other[0] if t == -1 else t for t in bad) if other else None
        out.append(dataclasses.replace(item, corrupt_context=bad))
    return out
