"""Extractive-QA data: facts-world items, SQuAD-format loading and its one-line errors."""

import json

import numpy as np
import pytest

from jaxinterp.experiments.common import UsageError
from jaxinterp.experiments.data.facts_world import FactsWorld, WorldConfig
from jaxinterp.experiments.extractive_qa import main as qa_main
from jaxinterp.experiments.extractive_qa.data import (batch, counterfactual_items, load_squad, silent_items,
                                                      split_sentences)

CONTEXT = "Cor rin lives in Paris . Al an speaks Greek . Fen el owns a cat ."


def _squad(qas, context=CONTEXT):
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def _qa(qid, question, text, start):
    return {"id": qid, "question": question, "answers": [{"text": text, "answer_start": start}]}


@pytest.fixture(scope="module")
def world():
    return FactsWorld(WorldConfig.tiny())


def test_facts_world_items(world):
    cf = counterfactual_items(world, 6, seed=0)
    for item in cf:
        diff = [i for i, (a, b) in enumerate(zip(item.ids, item.corrupt_context)) if a != b]
        s, e = item.sentence_spans[item.gold]
        assert len(diff) == 1 and s <= diff[0] < e and item.ids[diff[0]] == item.answer_id
        assert item.corrupt_context[diff[0]] not in (item.answer_id, item.memory_id) and item.answer_id != item.memory_id
    for item in silent_items(world, 6, seed=0):
        assert item.gold == -1 and len(item.corrupt_question) == len(item.ids) and item.corrupt_question != item.ids
        passage = world.decode(list(item.ids[: item.sentence_spans[-1][1]]))
        question = world.decode(list(item.ids[item.sentence_spans[-1][1]:]))
        subject = max((e.name for e in world.entities if f" {e.name} " in f" {question} "), key=len)
        assert f" {subject} " not in f" {passage} "
        assert item.answer_id == item.memory_id
    b = batch(cf, world.pad_id)
    row = b.tokens[0]
    assert (b.sentence_ids[0][b.mask[0]] >= -1).all() and b.tokens.shape == b.corrupt_context.shape
    j = int(b.gold[0])
    off = b.tokens.shape[1] - len(cf[0].ids)
    s, e = cf[0].sentence_spans[j]
    assert (np.flatnonzero(b.sentence_ids[0] == j) == np.arange(s + off, e + off)).all() and row[off] == world.bos_id


def test_squad_loads_sentences_and_gold(tmp_path, world):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(_squad([_qa("q1", "Al an speaks", "Greek", CONTEXT.index("Greek"))])))
    assert [CONTEXT[a:b] for a, b in split_sentences(CONTEXT)] == [
        "Cor rin lives in Paris .", "Al an speaks Greek .", "Fen el owns a cat ."]
    (item,) = load_squad(str(path), world.encode, world.bos_id)
    assert item.gold == 1 and item.answer_id == world.encode("Greek")[0]
    s, e = item.sentence_spans[1]
    assert world.decode(list(item.ids[s:e])) == "Al an speaks Greek ."
    assert item.corrupt_context is None  # a single record has no other answer to swap in


@pytest.mark.parametrize("data, words", [
    ({"rows": []}, ["not SQuAD format"]),
    ({"data": [{"paragraphs": [{"context": CONTEXT}]}]}, ["data[0].paragraphs[0]", '"qas"']),
    (_squad([{"id": "q7", "question": "x"}]), ["qas[0]", "'q7'", '"answers"']),
    (_squad([_qa("q1", "Al an speaks", "Greek", 0), _qa("q9", "x", "Tamil", 3)]), ["'q1'", "'Greek'", "answer_start 0"]),
])
def test_squad_errors_name_the_record(tmp_path, world, data, words):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UsageError) as err:
        load_squad(str(path), world.encode, world.bos_id)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg, (w, msg)


def test_command_line_bad_data_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_squad([_qa("q3", "Fen el owns a", "dog", 5)])))
    assert qa_main.main(["--model", "facts-gpt", "--set", f"data={path}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'q3'" in err and "not in the passage" in err and "Traceback" not in err
