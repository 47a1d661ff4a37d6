"""Training data: every source and format end to end on a real (tiny, in-memory) tokenizer, exact loss masks,
truncation, batching, resumable and sharded batch order, and the errors bad data gets."""

from __future__ import annotations

import csv
import functools
import json
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lorakit.errors import LorakitError
from lorakit.train.data import (
    IGNORE_INDEX,
    batch_order,
    collate,
    detect_format,
    infer_task,
    label_vocabulary,
    load_records,
    shard,
    tokenize,
)

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Review: the movie was great. Sentiment: positive",
    "Review: a dull and boring film. Sentiment: negative",
    "you are a helpful critic; tell me more about the plot",
]
TURN = "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
GENERATION_PROMPT = "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CHATML = "{% for m in messages %}" + TURN + "{% endfor %}" + GENERATION_PROMPT
TAGGED = (  # marks the assistant tokens itself, for return_assistant_tokens_mask
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n{% generation %}"
    "{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}" + TURN + "{% endif %}{% endfor %}"
    + GENERATION_PROMPT
)
COUNTED = "{{ messages | length }} messages\n" + CHATML  # a prefix rendering is not a prefix of the whole

CHAT = [
    {"role": "system", "content": "you are a helpful critic"},
    {"role": "user", "content": "the movie?"},
    {"role": "assistant", "content": "was great."},
    {"role": "user", "content": "tell me more"},
    {"role": "assistant", "content": "a dull plot"},
]


@functools.cache
def _trained() -> str:
    """A byte-level BPE trained in memory: exact decode round trips, any text encodable, no network."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def make_tokenizer(chat_template: str = CHATML, bos: bool = True) -> PreTrainedTokenizerFast:
    """bos=True prepends <s> by default, as Llama's tokenizers do; bos=False behaves like GPT-2's."""
    tok = Tokenizer.from_str(_trained())
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=chat_template
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def supervised(tokenizer, example: dict) -> list[str]:
    """The text of each run of consecutive tokens that carry loss."""
    runs, run = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            run.append(token)
        elif run:
            runs, run = runs + [run], []
    return [tokenizer.decode(r) for r in runs + ([run] if run else [])]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# ---------------------------------------------------------------- sources

ROWS = [{"text": "the movie was great", "label": "positive"}, {"text": "a dull, \"boring\"\nfilm", "label": "negative"}]


def _write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _source(kind, tmp_path, rows):
    if kind == "list":
        return rows
    if kind == "dataset":
        return pytest.importorskip("datasets").Dataset.from_list(rows)
    path = tmp_path / {"json-list": "d.json", "json-lines": "d.json"}.get(kind, f"d.{kind}")
    if kind == "json-list":
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    elif kind in ("jsonl", "json-lines"):
        write_jsonl(path, rows)
    elif kind == "csv":
        _write_csv(path, rows)
    else:
        _write_parquet(path, rows)
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "json-lines", "csv", "parquet", "list", "dataset"])
def test_every_source_reads_the_same_rows(kind, tmp_path):
    records = load_records(_source(kind, tmp_path, ROWS))
    assert records == ROWS
    assert detect_format(records) == "text_label"


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "dataset"])
def test_chat_rows_survive_nested_sources(kind, tmp_path, tokenizer):
    records = load_records(_source(kind, tmp_path, [{"messages": CHAT}]))
    assert records == [{"messages": CHAT}]
    data = tokenize(records, tokenizer, detect_format(records), max_length=256)
    assert supervised(tokenizer, data.examples[0]) == ["was great.<|im_end|>\n", "a dull plot<|im_end|>\n"]


def test_jsonl_skips_blank_lines_and_keeps_unicode(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "caf\\u00e9 \u2028 line"}\r\n\n   \n{"text": "b"}\n', encoding="utf-8")
    assert load_records(path) == [{"text": "caf\u00e9 \u2028 line"}, {"text": "b"}]


# ---------------------------------------------------------------- formats and loss masks


@pytest.mark.parametrize(
    "row, fmt, task",
    [
        ({"text": "a"}, "text", "causal-lm"),
        ({"prompt": "a", "completion": "b", "id": 3}, "prompt_completion", "causal-lm"),
        ({"messages": CHAT}, "messages", "causal-lm"),
        ({"text": "a", "label": 1}, "text_label", "classification"),
    ],
)
def test_detect_format_and_task(row, fmt, task):
    assert detect_format([row]) == fmt
    assert infer_task(fmt) == task


def test_text_trains_on_every_token(tmp_path, tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": CORPUS[0]}])
    records = load_records(tmp_path / "t.jsonl")
    data = tokenize(records, tokenizer, detect_format(records), max_length=128)
    (example,) = data.examples
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(example["input_ids"]) == f"<s>{CORPUS[0]}</s>"
    assert (data.n_truncated, data.n_dropped, data.task) == (0, 0, "causal-lm")


@pytest.mark.parametrize("bos", [True, False])
def test_prompt_completion_loss_is_on_the_completion_only(bos, tmp_path):
    tokenizer = make_tokenizer(bos=bos)
    rows = [{"prompt": "Review: the movie was great. Sentiment:", "completion": " positive"}]
    _write_csv(tmp_path / "pc.csv", rows)
    records = load_records(tmp_path / "pc.csv")
    (example,) = tokenize(records, tokenizer, detect_format(records), max_length=128).examples
    assert supervised(tokenizer, example) == [" positive</s>"]
    assert tokenizer.decode(example["input_ids"]) == ("<s>" if bos else "") + rows[0]["prompt"] + " positive</s>"
    prompt_ids = tokenizer(rows[0]["prompt"])["input_ids"]  # as the model will see it at inference
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("template", [CHATML, TAGGED], ids=["prefix-diff", "generation-tags"])
def test_chat_loss_is_on_assistant_turns_with_their_end_of_turn(template):
    tokenizer = make_tokenizer(template)
    (example,) = tokenize([{"messages": CHAT}], tokenizer, "messages", max_length=256).examples
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert supervised(tokenizer, example) == ["was great.<|im_end|>\n", "a dull plot<|im_end|>\n"]


def test_chat_falls_back_to_message_text_when_prefixes_disagree():
    tokenizer = make_tokenizer(COUNTED)
    echo = [{"role": "user", "content": "tell me more"}, {"role": "assistant", "content": "tell me more"}]
    with pytest.warns(UserWarning, match="inconsistently for 2 rows"):
        data = tokenize([{"messages": CHAT}, {"messages": echo}], tokenizer, "messages", max_length=256)
    assert supervised(tokenizer, data.examples[0]) == ["was great.", "a dull plot"]
    assert supervised(tokenizer, data.examples[1]) == ["tell me more"]
    ids, labels = data.examples[1]["input_ids"], data.examples[1]["labels"]
    first_supervised = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert first_supervised > ids.index(tokenizer.convert_tokens_to_ids("<|im_end|>"))  # not the user's echo


def test_classification_labels_are_sorted_or_given(tmp_path, tokenizer):
    rows = [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}, {"text": "c", "label": "neg"}]
    data = tokenize(load_records(rows), tokenizer, "text_label", max_length=16)
    assert data.label_names == ["neg", "pos"]
    assert [e["label"] for e in data.examples] == [0, 1, 0]
    assert data.examples[0]["input_ids"] == tokenizer("a")["input_ids"]
    given = tokenize(rows, tokenizer, "text_label", max_length=16, label_names=["pos", "neg"])
    assert [e["label"] for e in given.examples] == [1, 0, 1]


def test_csv_integer_labels_sort_numerically_and_match_integer_names(tmp_path, tokenizer):
    rows = [{"text": str(k), "label": k} for k in (10, 2, 0, 1)]
    _write_csv(tmp_path / "c.csv", rows)
    records = load_records(tmp_path / "c.csv")  # CSV cells are strings: "10", "2", ...
    data = tokenize(records, tokenizer, "text_label", max_length=16)
    assert data.label_names == label_vocabulary(records) == ["0", "1", "2", "10"]
    assert [e["label"] for e in data.examples] == [3, 2, 0, 1]
    named = tokenize(records, tokenizer, "text_label", max_length=16, label_names=[0, 1, 2, 10])
    assert [e["label"] for e in named.examples] == [3, 2, 0, 1]


# ---------------------------------------------------------------- truncation


def test_truncation_is_counted_and_warned_once(tokenizer):
    rows = [{"text": "a"}, {"text": CORPUS[0]}, {"text": CORPUS[1]}]
    with pytest.warns(UserWarning, match=r"2 of 3 rows were longer than max_length=8") as record:
        data = tokenize(rows, tokenizer, "text", max_length=8)
    assert len(record) == 1
    assert data.n_truncated == 2
    assert [len(e["input_ids"]) for e in data.examples] == [3, 8, 8]
    body = tokenizer.encode(CORPUS[0], add_special_tokens=False)
    assert data.examples[1]["input_ids"] == [tokenizer.bos_token_id] + body[:7]


def test_prompt_is_cut_on_the_left_so_the_completion_survives(tokenizer):
    prompt, completion = "Review: the movie was great. Sentiment:", " positive"
    completion_ids = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    max_length = len(completion_ids) + 3
    with pytest.warns(UserWarning, match="1 of 1 rows"):
        data = tokenize([{"prompt": prompt, "completion": completion}], tokenizer, "prompt_completion", max_length)
    (example,) = data.examples
    assert example["input_ids"] == [tokenizer.bos_token_id] + prompt_ids[-2:] + completion_ids
    assert supervised(tokenizer, example) == [" positive</s>"]


def test_overlong_completion_is_cut_on_the_right_after_bos(tokenizer):
    completion = " the movie was great and a dull film"
    completion_ids = tokenizer.encode(completion, add_special_tokens=False)
    with pytest.warns(UserWarning, match="truncated"):
        data = tokenize([{"prompt": "Review:", "completion": completion}], tokenizer, "prompt_completion", 5)
    (example,) = data.examples
    assert example["input_ids"] == [tokenizer.bos_token_id] + completion_ids[:4]
    assert example["labels"] == [IGNORE_INDEX] + completion_ids[:4]


def test_chat_cut_before_any_assistant_token_is_dropped_and_counted(tokenizer):
    fits = len(tokenizer(tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"])
    long_user = [{"role": "user", "content": " ".join(CORPUS * 2)}, {"role": "assistant", "content": "ok"}]
    with pytest.warns(UserWarning, match=r"1 of 2 rows .* Dropped 1 rows left with no token to learn from"):
        data = tokenize([{"messages": long_user}, {"messages": CHAT}], tokenizer, "messages", max_length=fits)
    assert (len(data), data.n_truncated, data.n_dropped, data.source_rows) == (1, 1, 1, [1])


def test_classification_truncation_keeps_the_special_tokens():
    tokenizer = make_tokenizer()
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    with pytest.warns(UserWarning, match="1 of 1 rows"):
        data = tokenize([{"text": CORPUS[0], "label": 1}], tokenizer, "text_label", max_length=6)
    ids = data.examples[0]["input_ids"]
    assert len(ids) == 6 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert data.n_truncated == 1


# ---------------------------------------------------------------- batching


def test_collate_pads_right_and_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = collate(examples, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = collate(examples, pad_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    assert all(t.dtype == torch.long for t in right.values())


def test_collate_classification_labels_are_class_ids(tokenizer):
    data = tokenize([{"text": CORPUS[0], "label": "b"}, {"text": "a", "label": "a"}], tokenizer, "text_label", 64)
    batch = collate(data.examples, tokenizer.pad_token_id)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in data.examples]


def test_batch_order_is_seeded_per_epoch_and_pinned():
    first = batch_order(10, 4, seed=0, epoch=0)
    assert first == [[3, 7, 6, 4], [1, 0, 2, 8], [5, 9]]  # NumPy's frozen RandomState stream: any platform
    assert batch_order(10, 4, seed=0, epoch=0) == first
    assert batch_order(10, 4, seed=0, epoch=1) != first
    assert batch_order(10, 4, seed=1, epoch=0) != first
    assert sorted(i for batch in first for i in batch) == list(range(10))
    assert batch_order(10, 4, seed=0, epoch=0, drop_last=True) == first[:2]
    assert batch_order(0, 4, seed=0, epoch=0) == []


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_shards_rebuild_the_global_batches(world_size):
    """world_size ranks with batch 12 / world_size each see exactly the batches of one process with batch 12."""
    batches = batch_order(52, 12, seed=7, epoch=3)
    parts = [shard(batches, rank, world_size) for rank in range(world_size)]
    for k, batch in enumerate(batches):
        assert sum((part[k] for part in parts), []) == batch
        sizes = [len(part[k]) for part in parts]
        assert sizes == [12 // world_size] * world_size if len(batch) == 12 else max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        ("", ".jsonl", "holds no rows"),
        ("\n\n", ".jsonl", "holds no rows"),
        ("", ".csv", "holds no rows"),
        ("text,label\n", ".csv", "holds no rows"),
        ("[]", ".json", "holds no rows"),
        ('{"text": "a"}\n{"text": "b",}\n', ".jsonl", r"line 2: invalid JSON"),
        ('[\n {"text": "a"},\n {"text": }\n]', ".json", r"line 3: invalid JSON"),
        ('{"text": "a"}\n\n[1, 2]\n', ".jsonl", r"data.jsonl line 3 is a list, not an object"),
        ("text\na\n", ".tsv", r"unknown data file type '.tsv'; use .jsonl"),
    ],
)
def test_bad_files_are_named_with_the_fix(content, suffix, message, tmp_path):
    path = tmp_path / f"data{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(LorakitError, match=message) as err:
        load_records(path)
    assert str(path) in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(LorakitError, match=r"nope.jsonl does not exist; pass a .jsonl"):
        load_records(tmp_path / "nope.jsonl")
    with pytest.raises(LorakitError, match="is a folder"):
        load_records(tmp_path)


def test_non_utf8_file(tmp_path):
    (tmp_path / "d.csv").write_bytes(b"text\ncaf\xe9\n")
    with pytest.raises(LorakitError, match="is not UTF-8 text"):
        load_records(tmp_path / "d.csv")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LorakitError, match="pip install pyarrow"):
        load_records(tmp_path / "d.parquet")


def test_corrupt_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    (tmp_path / "d.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LorakitError, match="not a readable Parquet file"):
        load_records(tmp_path / "d.parquet")


def test_dataset_dict_and_unknown_objects():
    datasets = pytest.importorskip("datasets")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(LorakitError, match=r"DatasetDict with splits train; pass one split"):
        load_records(splits)
    with pytest.raises(LorakitError, match="cannot read training data from a int"):
        load_records(3)
    with pytest.raises(LorakitError, match="the list holds no rows"):
        load_records([])


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], r"row 1 is missing field 'completion' \(the prompt_"),
        ([{"text": "a", "label": 0}, {"text": "b", "label": None}], r"row 1 is missing field 'label'"),
        ([{"text": "a"}, {"text": 3}], r"row 1: 'text' must be a string, got int"),
        ([{"messages": "[]"}], r"row 0: 'messages' must be a non-empty list .*\(a CSV cell cannot hold a list"),
        ([{"messages": [{"role": "user"}]}], r"row 0 message 0 needs a string 'role' and 'content'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], r"row 0 has no assistant message"),
        ([{"question": "a", "answer": "b"}], r"cannot tell the format from the fields \(answer, question\)"),
        ([], r"holds no rows"),
    ],
)
def test_bad_rows_name_the_row_and_field(rows, message):
    with pytest.raises(LorakitError, match=message):
        detect_format(rows, origin="train.jsonl")
    with pytest.raises(LorakitError, match="train.jsonl"):
        detect_format(rows, origin="train.jsonl")


def test_bad_tokenize_arguments(tokenizer):
    rows = [{"text": "a", "label": "x"}]
    with pytest.raises(LorakitError, match=r"label 'x', which is not in label_names \['y'\]"):
        tokenize(rows, tokenizer, "text_label", 16, label_names=["y"])
    with pytest.raises(LorakitError, match="label_names applies to text_label data only"):
        tokenize([{"text": "a"}], tokenizer, "text", 16, label_names=["y"])
    with pytest.raises(LorakitError, match="max_length must be an integer >= 2"):
        tokenize([{"text": "a"}], tokenizer, "text", 1)
    with pytest.raises(LorakitError, match="unknown data format 'chat'"):
        tokenize([{"text": "a"}], tokenizer, "chat", 16)
    with pytest.raises(LorakitError, match="must be distinct"):
        tokenize([{"text": "a", "label": 1}], tokenizer, "text_label", 16, label_names=[1, "1"])


def test_chat_without_template_or_refused_by_it():
    tokenizer = make_tokenizer(chat_template=None)
    with pytest.raises(LorakitError, match="no chat template"):
        tokenize([{"messages": CHAT}], tokenizer, "messages", 64)
    strict = make_tokenizer("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(LorakitError, match=r"row 0: the chat template refused the conversation \(roles must alternate"):
        tokenize([{"messages": CHAT}], strict, "messages", 64)


def test_bad_batching_arguments():
    with pytest.raises(LorakitError, match="no pad token"):
        collate([{"input_ids": [1], "labels": [1]}], pad_id=None)
    with pytest.raises(LorakitError, match="padding_side"):
        collate([{"input_ids": [1], "labels": [1]}], pad_id=0, padding_side="middle")
    with pytest.raises(LorakitError, match="classification and causal-LM"):
        collate([{"input_ids": [1], "labels": [1]}, {"input_ids": [1], "label": 0}], pad_id=0)
    with pytest.raises(LorakitError, match="batch_size must be an integer >= 1"):
        batch_order(10, 0, seed=0, epoch=0)
    with pytest.raises(LorakitError, match="seed must be an integer in 0.."):
        batch_order(10, 2, seed=-1, epoch=0)
    with pytest.raises(LorakitError, match=r"rank must be an integer in 0..1"):
        shard([[0, 1]], rank=2, world_size=2)
    with pytest.raises(LorakitError, match=r"batch 1 has 1 examples, fewer than world_size=2"):
        shard(batch_order(5, 4, seed=0, epoch=0)[:1] + [[4]], rank=0, world_size=2)
