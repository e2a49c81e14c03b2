"""Data: loading, tokenizing with label masks, packing/padding, resumable batches, every error path.

Offline and fast: tiny files in tmp dirs, the committed tiny-demo tokenizer, no model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_kit.data.batches import BatchStream
from qlora_kit.data.load import (
    IGNORE_INDEX,
    load_raw,
    resolve_data_path,
    tokenize,
)
from qlora_kit.errors import UsageError
from qlora_kit.recipe import DataSpec

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "qlora_kit" / "resources" / "tiny-demo"
CHAT = [
    {"role": "system", "content": "Be wise."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there."},
    {"role": "user", "content": "More"},
    {"role": "assistant", "content": "No."},
]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    """Keep datasets' Arrow cache out of the home directory."""
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def spec(path: str = "", **kw) -> DataSpec:
    return DataSpec(path=path, **kw)


def unique_examples(lengths, masked=0):
    """Example j is the token 1000+j repeated; its first ``masked`` labels are -100."""
    return [
        {"input_ids": [1000 + j] * n, "labels": [IGNORE_INDEX] * min(masked, n) + [1000 + j] * max(n - masked, 0)}
        for j, n in enumerate(lengths)
    ]


def take(stream, k):
    return [next(stream) for _ in range(k)]


def same_batches(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x) for x, y in zip(a, b, strict=True)
    )


# -- built-in data and the tiny tokenizer -------------------------------------------------------------


def test_builtin_path_resolves_to_the_packaged_quotes():
    path = Path(resolve_data_path("builtin:quotes"))
    assert path.name == "quotes.jsonl" and path.is_file()
    assert resolve_data_path("some/dataset") == "some/dataset"
    with pytest.raises(UsageError, match="unknown built-in dataset 'builtin:poems'"):
        resolve_data_path("builtin:poems")


def test_quotes_are_short_unique_and_attributed():
    rows = [json.loads(line) for line in Path(resolve_data_path("builtin:quotes")).read_text().splitlines()]
    assert len(rows) >= 300
    assert all(set(r) == {"quote", "author"} and r["author"] and 0 < len(r["quote"]) <= 200 for r in rows)
    assert len({r["quote"] for r in rows}) == len(rows)


def test_builtin_quotes_load_and_tokenize(tok):
    s = spec("builtin:quotes", text_field="quote", max_seq_len=64)
    raw = load_raw(s)
    assert len(raw) >= 300 and raw.column_names == ["quote", "author"]
    data = tokenize(s, raw, tok)
    assert data.samples == len(raw) >= 300 and data.dropped == 0 and data.eval is None
    assert all(e["input_ids"][0] == tok.bos_token_id for e in data.train)
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in data.train if len(e["input_ids"]) < 64)
    assert data.tokens == sum(len(e["input_ids"]) for e in data.train)


def test_tiny_tokenizer_and_config_agree(tok):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(TINY)
    assert config.model_type == "llama" and not config.tie_word_embeddings
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert tok.decode(tok("A penny saved.", add_special_tokens=False)["input_ids"]) == "A penny saved."


def test_tokenizer_script_regenerates_the_committed_files(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_tiny_tokenizer.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = sorted(p.name for p in TINY.iterdir())
    assert committed == sorted(p.name for p in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name


# -- loading ------------------------------------------------------------------------------------------


def _write(path: Path, kind: str) -> str:
    rows = [{"text": "one small step"}, {"text": "two"}, {"text": "three little words"}]
    if kind == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if kind == "json":
        path = path.with_suffix(".json")
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path = path.with_suffix(".csv")
        path.write_text("text,n\n" + "".join(f"{r['text']},{i}\n" for i, r in enumerate(rows)))
    elif kind == "parquet":
        from datasets import Dataset

        path = path.with_suffix(".parquet")
        Dataset.from_list(rows).to_parquet(str(path))
    else:  # txt: one sample per line, blank lines skipped
        path = path.with_suffix(".txt")
        path.write_text("one small step\n\ntwo\nthree little words\n")
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "txt"])
def test_every_file_format_loads_the_same_rows(tmp_path, kind):
    raw = load_raw(spec(_write(tmp_path / "d", kind)))
    assert list(raw["text"]) == ["one small step", "two", "three little words"]


def test_split_slices_and_unknown_splits(tmp_path):
    path = _write(tmp_path / "d", "jsonl")
    assert len(load_raw(spec(path, split="train[:2]"))) == 2
    with pytest.raises(UsageError, match="validation") as err:
        load_raw(spec(path, split="validation"))
    assert "data.split" in err.value.hint


@pytest.mark.parametrize(
    ("make", "kw", "pattern"),
    [
        (lambda p: "", {}, "data.path is not set"),
        (lambda p: str(p / "nope.jsonl"), {}, r"nope\.jsonl does not exist"),
        (lambda p: str(p / "nope"), {}, "does not exist"),  # an absolute path is never a hub id
        (lambda p: str(p), {}, "is a directory"),
        (lambda p: (p / "d.xlsx").write_text("x") and str(p / "d.xlsx"), {}, "unsupported extension '.xlsx'"),
        (lambda p: (p / "e.jsonl").write_text("\n \n") and str(p / "e.jsonl"), {}, "is empty"),
        (lambda p: (p / "h.csv").write_text("text,n\n") and str(p / "h.csv"), {}, "has no rows"),
        (
            lambda p: (p / "bad.jsonl").write_text('{"text": "a"\n') and str(p / "bad.jsonl"),
            {},
            "line 1 is not valid JSON",
        ),
        (lambda p: write_jsonl(p / "a.jsonl", [{"body": "x", "id": 1}]), {}, r"column 'text'.*columns: body, id"),
        (
            lambda p: write_jsonl(p / "a.jsonl", [{"q": "x", "a": "y"}]),
            {"format": "prompt_response", "prompt_field": "q"},
            r"column 'response' \(data\.response_field",
        ),
        (lambda p: write_jsonl(p / "a.jsonl", [{"text": 3}]), {}, "column 'text' must hold text"),
        (
            lambda p: write_jsonl(p / "a.jsonl", [{"messages": "hi"}]),
            {"format": "chat"},
            "column 'messages' must be a list of {role, content} messages",
        ),
    ],
    ids=[
        "no-path",
        "missing-file",
        "missing-path",
        "directory",
        "extension",
        "empty-file",
        "no-rows",
        "bad-json",
        "missing-column",
        "missing-response",
        "column-type",
        "chat-type",
    ],
)
def test_load_errors_name_the_problem(tmp_path, make, kw, pattern):
    with pytest.raises(UsageError, match=pattern) as err:
        load_raw(spec(make(tmp_path), **kw))
    assert err.value.hint


def test_hub_ids_fail_fast_offline(monkeypatch):
    from qlora_kit import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match=r"hub dataset 'someone/quotes': offline \(HF_HUB_OFFLINE is set\)"):
        load_raw(spec("someone/quotes"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "reachable", lambda host, *a, **k: False)
    with pytest.raises(UsageError, match=r"huggingface\.co is not reachable") as err:
        load_raw(spec("someone/quotes"))
    assert "local .jsonl" in err.value.hint


def test_reachability_probe_is_bounded():
    import time

    from qlora_kit.hub import reachable

    start = time.monotonic()
    assert not reachable("127.0.0.1", port=9, timeout_s=0.5)  # discard port: refused at once
    assert time.monotonic() - start < 2


# -- tokenizing ---------------------------------------------------------------------------------------


def test_text_labels_are_the_ids_plus_eos(tok):
    data = tokenize(spec(), [{"text": "Time is money."}, {"text": "Haste makes waste."}], tok)
    assert data.samples == 2 and data.truncated == data.dropped == 0
    for e, text in zip(data.train, ["Time is money.", "Haste makes waste."], strict=True):
        assert e["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
        assert e["labels"] == e["input_ids"]


def test_prompt_tokens_and_only_they_are_masked(tok):
    rows = [
        {"prompt": "Q: what is brevity?\nA:", "response": " the soul of wit."},
        {"prompt": "Say:", "response": " no"},
    ]
    data = tokenize(spec(format="prompt_response"), rows, tok)
    for e, row in zip(data.train, rows, strict=True):
        n_prompt = len(tok(row["prompt"])["input_ids"])
        response = tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert e["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:] == response


def test_chat_learns_only_assistant_turns(tok):
    data = tokenize(spec(format="chat"), [{"messages": CHAT}], tok)
    (e,) = data.train
    assert data.unmasked == 0
    assert tok.decode(e["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    learned = tok.decode([t for t in e["labels"] if t != IGNORE_INDEX])
    assert learned == "Hello there.</s>No.</s>"
    # labels are the ids wherever they are not masked
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(e["input_ids"], e["labels"], strict=True))


def test_chat_masking_with_a_chatml_template(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", CHATML)
    (e,) = tokenize(spec(format="chat"), [{"messages": CHAT}], tok).train
    learned = tok.decode([t for t in e["labels"] if t != IGNORE_INDEX])
    assert learned == "Hello there.<|im_end|>\nNo.<|im_end|>\n</s>"  # no eos in the template: appended


def test_chat_template_without_prefix_property_is_learned_whole(tok, monkeypatch):
    counting = "{{ messages | length }}:" + CHATML  # the header changes with the number of turns
    monkeypatch.setattr(tok, "chat_template", counting)
    data = tokenize(spec(format="chat"), [{"messages": CHAT}], tok)
    assert data.unmasked == 1 and data.train[0]["labels"] == data.train[0]["input_ids"]


def test_chat_needs_a_template_and_well_formed_messages(tok, monkeypatch):
    with pytest.raises(UsageError, match="row 0: column 'messages' must be a non-empty list"):
        tokenize(spec(format="chat"), [{"messages": [{"role": "user"}]}], tok)
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(UsageError, match="needs a tokenizer with a chat_template"):
        tokenize(spec(format="chat"), [{"messages": CHAT}], tok)


def test_a_template_error_names_the_row(tok, monkeypatch):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}" + CHATML
    monkeypatch.setattr(tok, "chat_template", strict)
    with pytest.raises(UsageError, match="row 1: the chat template refused the conversation: start with a user turn"):
        tokenize(spec(format="chat"), [{"messages": CHAT[1:]}, {"messages": CHAT}], tok)


def test_null_text_names_the_row(tok, tmp_path):
    raw = load_raw(spec(write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}, {"text": None}])))
    with pytest.raises(UsageError, match="row 1: column 'text' must be text, got NoneType"):
        tokenize(spec(), raw, tok)


def test_truncate_and_drop_are_counted(tok):
    long_text = "a long sentence that goes on and on " * 4
    rows = [{"text": "short"}, {"text": long_text}, {"text": long_text + "more"}]
    cut = tokenize(spec(max_seq_len=12, too_long="truncate"), rows, tok)
    assert (cut.samples, cut.truncated, cut.dropped) == (3, 2, 0)
    assert [len(e["input_ids"]) for e in cut.train][1:] == [12, 12]
    assert cut.train[1]["input_ids"] == tok(long_text)["input_ids"][:12]
    drop = tokenize(spec(max_seq_len=12, too_long="drop"), rows, tok)
    assert (drop.samples, drop.truncated, drop.dropped) == (1, 0, 2)
    assert drop.tokens == len(tok("short")["input_ids"]) + 1
    with pytest.raises(UsageError, match="every one of the 2 samples was dropped") as err:
        tokenize(spec(max_seq_len=12, too_long="drop"), rows[1:], tok)
    assert "max_seq_len" in err.value.hint


def test_a_prompt_longer_than_max_seq_len_leaves_nothing_to_learn(tok):
    rows = [{"prompt": "word " * 40, "response": " yes"}, {"prompt": "Q:", "response": " yes"}]
    data = tokenize(spec(format="prompt_response", max_seq_len=16), rows, tok)
    assert (data.samples, data.truncated, data.dropped) == (1, 1, 1)


def test_eval_split_is_seeded_and_disjoint(tok):
    rows = [{"text": f"sample number {i}"} for i in range(40)]
    a = tokenize(spec(eval_fraction=0.25), rows, tok, seed=1)
    b = tokenize(spec(eval_fraction=0.25), rows, tok, seed=1)
    c = tokenize(spec(eval_fraction=0.25), rows, tok, seed=2)
    assert len(a.eval) == 10 and len(a.train) == 30 and a.samples == 40
    assert a.eval == b.eval and a.eval != c.eval
    seen = {tuple(e["input_ids"]) for e in a.train} | {tuple(e["input_ids"]) for e in a.eval}
    assert len(seen) == 40
    with pytest.raises(UsageError, match="leaves nothing to train on"):
        tokenize(spec(eval_fraction=0.5), rows[:1], tok)


# -- batching -----------------------------------------------------------------------------------------


def test_padding_masks_the_padding_and_only_it():
    examples = unique_examples([3, 5, 2, 4, 1], masked=1)
    stream = BatchStream(examples, micro_batch=2, max_seq_len=8, packing=False, pad_id=7, seed=0)
    assert stream.epoch_batches == 3
    seen = []
    for batch in take(stream, 3):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        assert ids.shape == labels.shape == mask.shape and ids.shape[1] == int(mask.sum(1).max())
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            assert (ids[row, n:] == 7).all() and (labels[row, n:] == IGNORE_INDEX).all()
            j = int(ids[row, 0]) - 1000
            assert ids[row, :n].tolist() == examples[j]["input_ids"]
            assert labels[row, :n].tolist() == examples[j]["labels"]
            seen.append(j)
    assert sorted(seen) == list(range(5))  # every example once per epoch; the last batch is smaller
    assert stream.state_dict() == {"epoch": 1, "index": 0} and stream.epoch_float == 1.0


def test_epochs_reshuffle_and_seeds_differ():
    examples = unique_examples(range(1, 21))

    def order(seed, epochs=2):
        stream = BatchStream(examples, 4, 32, False, 0, seed)
        return [int(b["input_ids"][r, 0]) for b in take(stream, 5 * epochs) for r in range(4)]

    first = order(3)
    assert first == order(3)
    assert first != order(4)
    assert first[:20] != first[20:] and sorted(first[:20]) == sorted(first[20:])


def test_packing_gives_full_chunks_that_keep_label_masks():
    lengths = [5, 9, 3, 12, 7, 4, 8, 6]
    examples = unique_examples(lengths, masked=2)
    stream = BatchStream(examples, micro_batch=2, max_seq_len=8, packing=True, pad_id=0, seed=5)
    n_chunks = sum(lengths) // 8
    assert stream.epoch_batches == -(-n_chunks // 2)
    batches = take(stream, stream.epoch_batches)
    assert all("attention_mask" not in b for b in batches)
    assert all(b["input_ids"].shape[1] == 8 for b in batches)
    ids = [t for b in batches for t in b["input_ids"].flatten().tolist()]
    labels = [t for b in batches for t in b["labels"].flatten().tolist()]
    assert len(ids) == n_chunks * 8  # no padding anywhere
    # cut the stream back into runs of one example each: every run is that example (a prefix for the last)
    runs, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[start]:
            runs.append((ids[start:i], labels[start:i]))
            start = i
    order = [run[0][0] - 1000 for run in runs]
    assert len(set(order)) == len(order)
    for k, (run_ids, run_labels) in enumerate(runs):
        ex = examples[order[k]]
        n = len(run_ids)
        assert n == len(ex["input_ids"]) or k == len(runs) - 1
        assert run_ids == ex["input_ids"][:n] and run_labels == ex["labels"][:n]


def test_packing_needs_one_full_chunk():
    with pytest.raises(UsageError, match="packing needs at least max_seq_len=64 tokens"):
        BatchStream(unique_examples([3, 4]), 1, 64, True, 0)


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("consumed", [0, 3, 7, 11])
def test_a_restored_stream_yields_the_same_batches(packing, consumed):
    examples = unique_examples([3, 7, 2, 9, 5, 4, 6, 8, 1, 5, 3], masked=1)
    args = (examples, 3, 10, packing, 0, 17)
    original = BatchStream(*args)
    take(original, consumed)  # crosses epoch boundaries for the larger values
    state = original.state_dict()
    progress = original.epoch_float
    restored = BatchStream(*args)
    restored.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert restored.epoch_float == progress
    assert same_batches(take(original, 10), take(restored, 10))


def test_state_outside_the_data_is_refused():
    stream = BatchStream(unique_examples([2, 3, 4]), 2, 8, False, 0)
    with pytest.raises(ValueError, match="outside this data"):
        stream.load_state_dict({"epoch": 0, "index": 2})


def test_tokenized_quotes_feed_a_stream(tok):
    s = spec("builtin:quotes", text_field="quote", max_seq_len=48, packing=True, eval_fraction=0.1)
    data = tokenize(s, load_raw(s), tok, seed=0)
    stream = BatchStream(data.train, 4, s.max_seq_len, s.packing, tok.pad_token_id, seed=0)
    batch = next(stream)
    assert batch["input_ids"].shape == (4, 48) and batch["input_ids"].max() < len(tok)
    assert 0 < stream.epoch_float < 1
