"""The data layer: every task config loads offline, the sampling protocol, errors, collators."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch

from gem.data import DataError, TaskData, available_tasks, encoder_collator, load_task, load_task_config
from gem.data.loading import flatten_multirc
from gem.data.sampling import draw_test, draw_train_dev, fallback_split, train_dev_sizes

SHARED_DATA = Path(os.environ.get("GEM_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")

EXPECTED = {  # name: (kind, number of labels, main metric)
    "sst2": ("classification", 2, "acc"), "rte": ("classification", 2, "acc"),
    "boolq": ("classification", 2, "acc"), "wic": ("classification", 2, "acc"),
    "cb": ("classification", 3, "acc"), "copa": ("multiple_choice", 2, "acc"),
    "cola": ("classification", 2, "mcc"), "mrpc": ("classification", 2, "f1"),
    "stsb": ("regression", 1, "pearson"), "qnli": ("classification", 2, "acc"),
    "multirc": ("classification", 2, "acc"), "gsm8k": ("generation", 0, "em"),
    "mbpp": ("generation", 0, "pass@1"), "squad": ("generation", 0, "f1"),
}
LOCAL_TASKS = sorted(set(EXPECTED) - {"squad"})  # no SQuAD files in ../shared/data


@pytest.fixture(scope="module")
def data_dir() -> str:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data folder {SHARED_DATA} is absent")
    return str(SHARED_DATA)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the Hub: offline flags on, GEM_DATA_DIR unset unless a test sets it."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("GEM_DATA_DIR", raising=False)


def small(name: str, **overrides):
    sizes = {"num_train": 20, "num_dev": 10, "num_test": 30}
    sizes.update(overrides)
    return load_task_config(name, **sizes)


def uids(examples) -> set[str]:
    return {ex["uid"] for ex in examples}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "man", "because", "so", ".", "a"]
    path = tmp_path_factory.mktemp("tok") / "vocab.txt"
    path.write_text("\n".join(words) + "\n")
    return BertTokenizer(vocab_file=str(path))


# --------------------------------------------------------------------------- configs


def test_every_expected_task_has_a_config():
    assert set(available_tasks()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_schema(name):
    cfg = load_task_config(name)
    for key in ("name", "kind", "metrics", "num_train", "num_dev", "num_test", "test_seed", "max_length",
                "fields", "local", "hub"):
        assert key in cfg, key
    assert cfg.name == name and cfg.kind == EXPECTED[name][0] and cfg.metrics[0] == EXPECTED[name][2]
    assert cfg.hub.path and "test" in cfg.hub.splits and "test" in cfg.local.files


# --------------------------------------------------------------------------- every task, offline


@pytest.mark.parametrize("name", LOCAL_TASKS)
def test_task_loads_offline(name, data_dir):
    task = load_task(small(name), data_dir, seed=1)
    kind, num_labels, main = EXPECTED[name]
    assert isinstance(task, TaskData)
    assert (task.name, task.kind, task.num_labels, task.main_metric) == (name, kind, num_labels, main)
    assert task.source.startswith("local:" + str(Path(data_dir).resolve()))
    sizes = task.split_sizes
    assert 0 < sizes["train"] <= 20 and 0 < sizes["dev"] <= 10 and 0 < sizes["test"] <= 30
    for ex in task.train + task.dev + task.test:
        assert isinstance(ex["text_a"], str) and ex["text_a"]
        assert ex["text_b"] is None or isinstance(ex["text_b"], str)
        assert isinstance(ex["raw"], dict) and ex["uid"].startswith(f"{name}/")
        if kind in ("classification", "multiple_choice"):
            assert isinstance(ex["label"], int) and 0 <= ex["label"] < len(task.label_names)
        elif kind == "regression":
            assert isinstance(ex["label"], float) and 0.0 <= ex["label"] <= 5.0
        else:
            assert ex["label"] is None and isinstance(ex["target"], str) and ex["target"]
        if kind == "multiple_choice":
            assert len(ex["choices"]) == 2 and ex["question"] in ("cause", "effect")
    assert not uids(task.train) & uids(task.dev)
    assert not (uids(task.train) | uids(task.dev)) & uids(task.test)


def test_sst2_full_protocol_and_label_balance(data_dir):
    task = load_task(load_task_config("sst2"), data_dir, seed=0)
    assert task.split_sizes == {"train": 1000, "dev": 500, "test": 872}  # test = all 872 validation rows
    assert task.label_names == ["negative", "positive"] and task.notes == []
    positive = sum(ex["label"] for ex in task.train) / len(task.train)
    assert 0.45 < positive < 0.65  # SST-2 train is about 56% positive
    assert {ex["label"] for ex in task.test} == {0, 1}
    assert all(ex["uid"].startswith("sst2/validation/") for ex in task.test)
    assert all(ex["uid"].startswith("sst2/train/") for ex in task.train + task.dev)


def test_field_mappings(data_dir):
    wic = load_task(small("wic"), data_dir, seed=0).train[0]
    assert wic["text_a"] == wic["raw"]["sentence1"] and wic["text_b"] == wic["raw"]["sentence2"]
    assert wic["word"] == wic["raw"]["word"]
    mrpc = load_task(small("mrpc"), data_dir, seed=0).test[0]
    assert mrpc["text_a"] == mrpc["raw"]["#1 String"].strip() and "Quality" in mrpc["raw"]  # BOM stripped
    cola = load_task(small("cola"), data_dir, seed=0).train[0]
    assert cola["raw"]["sentence"].strip() == cola["text_a"] and set(cola["raw"]) >= {"source", "label"}
    cb = load_task(small("cb"), data_dir, seed=0)
    assert cb.label_names == ["entailment", "contradiction", "neutral"] and cb.metrics == ["acc", "f1"]
    for ex in cb.test:
        assert cb.label_names[ex["label"]] == ex["raw"]["label"]


# --------------------------------------------------------------------------- seeds and sizes


def test_seeds_reproduce_and_differ(data_dir):
    cfg = small("rte", num_test=100)
    a, b, c = (load_task(cfg, data_dir, seed=s) for s in (3, 3, 4))
    assert [ex["uid"] for ex in a.train] == [ex["uid"] for ex in b.train]
    assert [ex["uid"] for ex in a.dev] == [ex["uid"] for ex in b.dev]
    assert uids(a.train) != uids(c.train) and uids(a.dev) != uids(c.dev)
    assert [ex["uid"] for ex in a.test] == [ex["uid"] for ex in c.test]  # test fixed by test_seed


def test_test_seed_changes_only_the_test_subset(data_dir):
    base = load_task(small("cola"), data_dir, seed=1)
    other = load_task(small("cola", test_seed=1), data_dir, seed=1)
    assert uids(base.train) == uids(other.train) and uids(base.test) != uids(other.test)


def test_small_train_splits_cb_copa(data_dir):
    cb = load_task(load_task_config("cb"), data_dir, seed=0)
    assert cb.split_sizes == {"train": 200, "dev": 50, "test": 56}
    copa = load_task(load_task_config("copa"), data_dir, seed=0)
    assert copa.split_sizes == {"train": 360, "dev": 40, "test": 100}  # the paper's COPA split
    for task in (cb, copa):
        assert not uids(task.train) & uids(task.dev)
        assert any("only" in note and "train/dev" in note for note in task.notes)


def test_boolq_fallback(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="gem.data"):
        a = load_task(load_task_config("boolq"), data_dir, seed=1)
    b = load_task(load_task_config("boolq"), data_dir, seed=2)
    assert a.split_sizes == {"train": 1000, "dev": 500, "test": 1000}
    assert any("fallback" in note and "train" in note for note in a.notes)
    assert any("fallback" in rec.getMessage() for rec in caplog.records)
    for task in (a, b):
        assert not uids(task.test) & (uids(task.train) | uids(task.dev))
        assert not uids(task.train) & uids(task.dev)
        assert all(ex["uid"].startswith("boolq/validation/") for ex in task.train + task.dev + task.test)
    assert uids(a.test) == uids(b.test) and uids(a.train) != uids(b.train)
    assert len(uids(a.train) | uids(a.dev) | uids(a.test)) == 2500  # all distinct rows of the 3270


def test_qnli_fallback_caps_test_at_half(data_dir):
    task = load_task(small("qnli", num_test=None), data_dir, seed=0)
    assert task.split_sizes["test"] == 5463 // 2 and task.notes


def test_mbpp_splits(data_dir):
    task = load_task(load_task_config("mbpp"), data_dir, seed=0)
    assert task.split_sizes == {"train": 120, "dev": 43, "test": 257}
    assert all(601 <= ex["raw"]["task_id"] <= 974 for ex in task.train)
    assert all(511 <= ex["raw"]["task_id"] <= 600 for ex in task.dev)
    assert all(11 <= ex["raw"]["task_id"] <= 510 for ex in task.test)
    assert all(ex["raw"]["test_list"] and ex["target"].strip() for ex in task.test)
    assert task.notes


def test_gsm8k_answers(data_dir):
    task = load_task(small("gsm8k", num_test=None), data_dir, seed=0)
    assert task.split_sizes["test"] == 1319
    assert all("####" in ex["target"] and ex["target"] == ex["raw"]["answer"] for ex in task.train + task.test)
    assert all(ex["text_a"] == ex["raw"]["question"].strip() for ex in task.test)


def test_multirc_flattening(data_dir):
    rows = [json.loads(line) for line in open(Path(data_dir) / "super_glue/MultiRC/val.jsonl")]
    flat = flatten_multirc(rows)
    assert len(flat) == 4848
    task = load_task(small("multirc", num_test=None), data_dir, seed=0)
    assert task.split_sizes["test"] == 4848 and len(uids(task.test)) == 4848
    ex = task.test[0]
    assert set(ex["raw"]["idx"]) == {"paragraph", "question", "answer"}
    assert ex["text_b"] == f"{ex['raw']['question']} {ex['raw']['answer']}".strip()
    assert ex["label"] == ex["raw"]["label"]


# --------------------------------------------------------------------------- SQuAD (hand-made)


def _squad_file(path: Path, articles: int, prefix: str):
    data = [{"title": f"T{a}", "paragraphs": [
        {"context": f"Paris is the capital of France. Article {a} paragraph {p}.",
         "qas": [{"id": f"{prefix}{a}{p}{q}", "question": f"What is the capital {q}?",
                  "answers": [{"text": "Paris", "answer_start": 0}, {"text": "Paris", "answer_start": 0}]}
                 for q in range(2)]} for p in range(2)]} for a in range(articles)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": "1.1", "data": data}))


def test_squad_local_layout(tmp_path):
    _squad_file(tmp_path / "squad/train-v1.1.json", 3, "tr")  # 12 questions
    _squad_file(tmp_path / "squad/dev-v1.1.json", 1, "dv")  # 4 questions
    task = load_task(load_task_config("squad", num_train=8, num_dev=3, num_test=None), str(tmp_path), seed=0)
    assert task.split_sizes == {"train": 8, "dev": 3, "test": 4} and task.kind == "generation"
    ex = task.test[0]
    assert ex["target"] == "Paris" and ex["text_b"].startswith("What is the capital")
    assert ex["raw"]["answers"] == {"text": ["Paris", "Paris"], "answer_start": [0, 0]}
    assert ex["uid"].startswith("squad/validation/dv")


# --------------------------------------------------------------------------- errors


def test_offline_without_data_raises_at_once():
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        load_task(load_task_config("sst2"), None, seed=0)
    assert time.perf_counter() - started < 2.0
    message = str(info.value)
    assert "data_dir=PATH" in message and "GEM_DATA_DIR" in message and "nyu-mll/glue" in message


def test_gem_data_dir_env_is_used(data_dir, monkeypatch):
    monkeypatch.setenv("GEM_DATA_DIR", data_dir)
    task = load_task(small("rte"), None, seed=0)
    assert task.source.startswith("local:")


def test_missing_file_names_it_and_the_layout(tmp_path):
    (tmp_path / "glue/SST-2").mkdir(parents=True)
    (tmp_path / "glue/SST-2/dev.tsv").write_text("sentence\tlabel\ngood .\t1\n")
    with pytest.raises(DataError, match=r"glue/SST-2/train\.tsv.*Expected layout"):
        load_task(load_task_config("sst2"), str(tmp_path), seed=0)
    with pytest.raises(DataError, match="not a folder"):
        load_task(load_task_config("sst2"), str(tmp_path / "nowhere"), seed=0)


def _sst2_dir(tmp_path: Path, train_rows: str, dev_rows: str) -> str:
    (tmp_path / "glue/SST-2").mkdir(parents=True)
    (tmp_path / "glue/SST-2/train.tsv").write_text("sentence\tlabel\n" + train_rows)
    (tmp_path / "glue/SST-2/dev.tsv").write_text("sentence\tlabel\n" + dev_rows)
    return str(tmp_path)


def test_label_outside_the_set(tmp_path):
    root = _sst2_dir(tmp_path, "good .\t1\nbad .\t0\nodd .\t2\n", "fine .\t1\n")
    with pytest.raises(DataError, match=r"sst2/train/2 has label 2"):
        load_task(load_task_config("sst2"), root, seed=0)


def test_empty_split(tmp_path):
    root = _sst2_dir(tmp_path, "good \" quote .\t1\nbad .\t0\nnull\t0\n", "")
    with pytest.raises(DataError, match="empty|no rows"):
        load_task(load_task_config("sst2"), root, seed=0)


def test_tsv_quotes_and_na_strings_survive(tmp_path):
    root = _sst2_dir(tmp_path, "good \" quote .\t1\nbad .\t0\nnull\t0\nNA\t1\n", "fine .\t1\n")
    task = load_task(load_task_config("sst2", num_dev=1), root, seed=0)
    assert {ex["text_a"] for ex in task.train + task.dev} == {'good " quote .', "bad .", "null", "NA"}


# --------------------------------------------------------------------------- sampling rules


def test_sampling_rules():
    assert train_dev_sizes(10_000, 1000, 500, None)[:2] == (1000, 500)
    assert train_dev_sizes(250, 1000, 500, 0.2)[:2] == (200, 50)
    assert train_dev_sizes(400, 1000, 500, 0.1)[:2] == (360, 40)
    assert train_dev_sizes(300, 1000, 500, None)[:2] == (200, 100)  # requested share 1/3
    assert train_dev_sizes(100, None, 10, None)[:2] == (90, 10)
    assert train_dev_sizes(100, 30, None, None)[:2] == (30, 70)
    assert train_dev_sizes(100, None, None, None)[:2] == (90, 10)
    # a num_train far beyond the data: dev keeps min(num_dev, 10 % of the rows), not one example
    assert train_dev_sizes(2490, 100_000, 16, None)[:2] == (2474, 16)
    assert train_dev_sizes(2490, 100_000, 500, None)[:2] == (2241, 249)
    train, dev, note = draw_train_dev(100, 30, 20, seed=5)
    assert len(train) == 30 and len(dev) == 20 and not set(train) & set(dev) and note is None
    assert draw_test(50, None, 0) == list(range(50)) and draw_test(50, 10, 0) == draw_test(50, 10, 0)
    test, rest = fallback_split(11, 1000, 0)
    assert len(test) == 5 and len(rest) == 6 and not set(test) & set(rest)


# --------------------------------------------------------------------------- collators


def test_classification_collator(data_dir, tokenizer):
    task = load_task(small("rte"), data_dir, seed=0)
    batch = encoder_collator(tokenizer, task, 64)(task.train[:4])
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 64
    assert batch["attention_mask"].shape == batch["input_ids"].shape
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [ex["label"] for ex in task.train[:4]]
    assert (batch["token_type_ids"] == 1).any()  # pairs


def test_regression_collator(data_dir, tokenizer):
    task = load_task(small("stsb"), data_dir, seed=0)
    batch = encoder_collator(tokenizer, task, 32)(task.dev[:3])
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (3,)
    assert torch.allclose(batch["labels"], torch.tensor([ex["label"] for ex in task.dev[:3]]))


def test_copa_collator(data_dir, tokenizer):
    task = load_task(small("copa"), data_dir, seed=0)
    collate = encoder_collator(tokenizer, task, 32)
    batch = collate(task.test[:5])
    assert batch["input_ids"].shape[:2] == (5, 2) and batch["attention_mask"].shape[:2] == (5, 2)
    assert batch["labels"].shape == (5,) and batch["labels"].dtype == torch.long
    ids = batch["input_ids"][0, 0].tolist()
    connective = {"cause": "because", "effect": "so"}[task.test[0]["question"]]
    assert tokenizer.convert_tokens_to_ids(connective) in ids


def test_truncation_is_counted_and_warned_once(tokenizer, caplog):
    task = TaskData(name="toy", kind="classification", label_names=["a", "b"], metrics=["acc"],
                    train=[], dev=[], test=[], source="test")
    long = {"text_a": "the man " * 40, "text_b": None, "label": 1}
    short = {"text_a": "the man", "text_b": None, "label": 0}
    collate = encoder_collator(tokenizer, task, 16)
    with caplog.at_level(logging.WARNING, logger="gem.data"):
        first = collate([long, short, long])
        collate([long])
    assert first["input_ids"].shape == (3, 16)
    assert collate.num_truncated == 3 and collate.num_sequences == 4
    assert sum("truncated" in rec.getMessage() for rec in caplog.records) == 1


def test_generation_has_no_encoder_collator(data_dir, tokenizer):
    task = load_task(small("gsm8k"), data_dir, seed=0)
    with pytest.raises(DataError, match="generation"):
        encoder_collator(tokenizer, task, 64)


# --------------------------------------------------------------------------- the Hub path (faked)


def test_hub_rows_map_like_local_rows(monkeypatch):
    import datasets

    rows = {
        ("nyu-mll/glue", "sst2"): [{"sentence": f"s{i} ", "label": i % 2, "idx": i} for i in range(40)],
        ("aps/super_glue", "copa"): [{"premise": f"p{i}.", "choice1": "A b.", "choice2": "C d.", "question": "effect",
                                      "label": i % 2, "idx": i} for i in range(40)],
    }
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows[(path, name)])

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    sst2 = load_task(small("sst2"), None, seed=0)
    assert sst2.source == "hub:nyu-mll/glue/sst2" and sst2.split_sizes == {"train": 20, "dev": 10, "test": 30}
    assert ("nyu-mll/glue", "sst2", "validation") in calls
    assert all(ex["label"] == int(ex["text_a"][1:]) % 2 for ex in sst2.train)
    copa = load_task(small("copa"), None, seed=0)
    assert copa.train[0]["choices"] == ["A b.", "C d."] and copa.train[0]["question"] == "effect"

    def failing(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError, match="GEM_DATA_DIR.*no network"):
        load_task(small("rte"), None, seed=0)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("num_examples", [1, 16, 40, 47])
def test_gradient_pass_shares_rebuild_the_single_process_batches(world_size, num_examples):
    from gem.lit.datamodule import gradient_pass_share

    examples, batch_size = list(range(num_examples)), 16
    single = [examples[i:i + batch_size] for i in range(0, num_examples, batch_size)]
    union = []
    for rank in range(world_size):
        share = gradient_pass_share(examples, batch_size, rank, world_size)
        batches = [share[i:i + batch_size] for i in range(0, len(share), batch_size)]  # as the DataLoader cuts them
        assert batches == single[rank::world_size]
        union += batches
    # every single-process batch appears exactly once over the ranks, so the all-reduced sum of
    # per-batch gradients does not depend on the number of ranks
    assert sorted(union) == sorted(single)
