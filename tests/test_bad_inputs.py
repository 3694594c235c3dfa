"""Plausible mistakes in data files, column choices and model directories give a clear DataError/ModelError naming
the file, column, line or value -- never a raw traceback or a silently useless run."""

from __future__ import annotations

import bz2
import gzip
import json
import pathlib
import shutil

import pytest

from fedlora.data import DataError, load_table, prepare_federated_data
from fedlora.models import ModelError, load_tokenizer
from fedlora.models.loading import check_tokenizer, load_sequence_classifier


def _rows(n: int = 40, labels: tuple = ("cat", "dog")) -> list[dict]:
    return [{"text": f"sentence number {i}", "label": labels[i % len(labels)], "num": i} for i in range(n)]


def _write_csv(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    lines = [",".join(rows[0])] + [",".join(str(v) for v in row.values()) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------------------- data: columns


def test_same_column_for_text_and_label_is_rejected_before_reading(tmp_path: pathlib.Path) -> None:
    # The file does not exist: the column check must come first, so the error is about the columns.
    missing = str(tmp_path / "never-read.csv")
    with pytest.raises(DataError, match="'text' is given as both the text column and the label column"):
        load_table(missing, text_column="text", label_column="text")
    with pytest.raises(DataError, match="'label' is given as both"):
        prepare_federated_data(missing, num_clients=2, text_column="label", label_column="label")
    with pytest.raises(DataError, match="label_column must be the non-empty name of a column"):
        load_table(missing, label_column="")


def test_label_column_that_is_null_everywhere_is_named(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nolabels.csv"
    path.write_text("text,label\n" + "".join(f"text {i},\n" for i in range(20)))
    with pytest.raises(DataError, match=r"label column 'label' of .*nolabels.csv' is empty \(null\) in all 20 rows"):
        prepare_federated_data(str(path), num_clients=2)


def test_numeric_text_column_is_rejected(tmp_path: pathlib.Path) -> None:
    path = _write_csv(tmp_path / "toy.csv", _rows())
    with pytest.raises(DataError, match=r"text column 'num' of .* holds numbers \(int64, e.g. 0, 1, 2\), not text"):
        prepare_federated_data(str(path), num_clients=2, text_column="num")


def test_label_column_with_a_value_per_row_is_rejected(tmp_path: pathlib.Path) -> None:
    path = _write_csv(tmp_path / "toy.csv", _rows())
    with pytest.raises(DataError, match=r"label column 'num' .* has 40 distinct values in 40 rows .*text or id column"):
        prepare_federated_data(str(path), num_clients=2, label_column="num")
    # A long tail of rare labels is fine once the labels to use are chosen explicitly.
    rows = _rows(30) + [{"text": f"rare {i}", "label": f"rare{i}", "num": i} for i in range(40)]
    path = _write_csv(tmp_path / "tail.csv", rows)
    with pytest.raises(DataError, match=r"label column 'label' .* has 42 distinct values in 70 rows"):
        prepare_federated_data(str(path), num_clients=2)
    data = prepare_federated_data(str(path), num_clients=2, partition="iid", labels=["cat", "dog"])
    assert data.label_names == ["cat", "dog"]


def test_single_label_and_too_few_examples(tmp_path: pathlib.Path) -> None:
    path = _write_csv(tmp_path / "one.csv", _rows(labels=("cat",)))
    with pytest.raises(DataError, match=r"at least 2 distinct labels.*has 1 \(cat\)"):
        prepare_federated_data(str(path), num_clients=2)
    path = _write_csv(tmp_path / "few.csv", _rows(n=6))
    with pytest.raises(DataError, match="too few for 5 clients"):
        prepare_federated_data(str(path), num_clients=5)


def test_whole_float_labels_are_integers_and_blank_texts_are_dropped(tmp_path: pathlib.Path) -> None:
    # Labels 0.0 .. 11.0 (as a CSV column with gaps gives them) keep their numeric order: 2 before 10.
    rows = [{"text": f"sentence {i}" if i % 10 else "   ", "label": float(i % 12)} for i in range(240)]
    path = tmp_path / "floats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"Dropped 24 of 240 rows.*0 without a 'label' value, 24 with a missing or"):
        data = prepare_federated_data(str(path), num_clients=2, partition="iid", global_test_fraction=0.0)
    assert data.label_names == [str(i) for i in range(12)]
    texts = [t for c in data.clients for t in list(c.train["text"]) + list(c.test["text"])]
    labels = [y for c in data.clients for y in list(c.train["label"]) + list(c.test["label"])]
    assert len(texts) == 216 and all(t.strip() for t in texts)
    assert all(int(t.split()[1]) % 12 == y for t, y in zip(texts, labels, strict=True))


# --------------------------------------------------------------------------------------------- data: files


NO_ROWS = {  # file name -> (content, expected message)
    "header.csv": ("text,label\n", r"header.csv' has no rows: it holds only the header line 'text,label'"),
    "header.tsv": ("text\tlabel\n\n", r"header.tsv' has no rows: it holds only the header line"),
    "header.csv.gz": (gzip.compress(b"text,label\n", mtime=0), r"header.csv.gz' has no rows: it holds only the header"),
    "empty.csv": ("", r"empty.csv' is empty \(0 bytes\): it has no rows"),
    "empty.jsonl": ("", r"empty.jsonl' is empty \(0 bytes\): it has no rows"),
    "blank.jsonl": ("\n  \n", r"blank.jsonl': it has no rows \(it holds only blank lines\)"),
    "array.json": ("[]", r"array.json': it has no rows \(it holds an empty array\)"),
}


@pytest.mark.parametrize("name", list(NO_ROWS))
def test_files_without_rows(tmp_path: pathlib.Path, name: str) -> None:
    content, match = NO_ROWS[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        load_table(str(path))


def _jsonl_with_bad_line(bad: str, at: int, n: int = 9) -> str:
    lines = [json.dumps(r) for r in _rows(n)]
    lines.insert(at - 1, bad)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("name", "compress"),
    [("bad.jsonl", None), ("bad.ndjson", None), ("bad.jsonl.gz", gzip.compress), ("bad.jsonl.bz2", bz2.compress)],
)
def test_malformed_jsonl_line_is_reported_with_its_number(tmp_path: pathlib.Path, name: str, compress) -> None:
    text = _jsonl_with_bad_line('{"text": "broken", "label": "cat"', at=7)
    path = tmp_path / name
    path.write_bytes(compress(text.encode()) if compress else text.encode())
    with pytest.raises(DataError) as info:
        load_table(str(path))
    message = str(info.value)
    assert name in message and "line 7:" in message and '{"text": "broken", "label": "cat"' in message
    assert "line 6" not in message and "row 6" not in message


def test_jsonl_line_that_is_not_an_object(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text(_jsonl_with_bad_line('["a", "b"]', at=3))
    with pytest.raises(DataError, match=r"list.jsonl': line 3 is an array, not an object .*'\[\"a\", \"b\"\]'"):
        load_table(str(path))


def test_files_that_are_not_utf8_name_the_line(tmp_path: pathlib.Path) -> None:
    # pyarrow's JSON reader accepts the bytes; reading the texts later would fail with a raw UnicodeDecodeError
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(_jsonl_with_bad_line('{"text": "caf\xe9", "label": "cat"}', at=5).encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1.jsonl' is not UTF-8 text: column 'text' holds invalid bytes \(line 5\)"
    ):
        load_table(str(path))
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nok,cat\nstill ok,dog\ncaf\xe9,cat\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv' is not UTF-8 text: line 4 holds invalid bytes"):
        load_table(str(path))


def test_malformed_json_array_reports_the_line(tmp_path: pathlib.Path) -> None:
    rows = _rows(5)
    text = json.dumps(rows, indent=2).replace('"sentence number 3",', '"sentence number 3"')
    bad_line = next(i for i, line in enumerate(text.split("\n"), start=1) if '"sentence number 3"' in line) + 1
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"rows.json': line {bad_line}: Expecting ',' delimiter"):
        load_table(str(path))


def test_unreadable_files_name_the_real_cause(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "notgzip.csv.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match=r"notgzip.csv.gz': BadGzipFile"):
        load_table(str(path))
    path = tmp_path / "ragged.csv"
    path.write_text("text,label\na,b\nc,d,e,f\n")
    with pytest.raises(DataError, match=r"ragged.csv': ParserError: .*line 3"):
        load_table(str(path))


def test_zstd_file_without_zstandard_says_what_to_install(tmp_path: pathlib.Path) -> None:
    import importlib.util

    if importlib.util.find_spec("zstandard") is not None:
        pytest.skip("zstandard is installed here")
    path = tmp_path / "rows.jsonl.zst"
    path.write_bytes(b"(\xb5/\xfd not really zstd")
    with pytest.raises(DataError, match=r"rows.jsonl.zst': .zst files need the Python package 'zstandard'"):
        load_table(str(path))


# ------------------------------------------------------------------------------------------------- models


def _model_copy(tiny_bert: str, tmp_path: pathlib.Path, name: str = "model") -> pathlib.Path:
    target = tmp_path / name
    shutil.copytree(tiny_bert, target)
    return target


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b[: len(b) // 2],  # truncated download
        lambda b: b[:3000],  # header cut
        lambda b: b"<html>404 Not Found</html>",  # an error page saved as the weights
        lambda b: b"",
    ],
    ids=["half", "header-cut", "html-page", "empty"],
)
def test_corrupt_safetensors_names_the_file(tiny_bert: str, tmp_path: pathlib.Path, damage) -> None:
    model_dir = _model_copy(tiny_bert, tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ModelError, match=rf"weights file {weights} is corrupt or truncated"):
        load_sequence_classifier(str(model_dir), 3, seed=0)


def test_corrupt_pytorch_bin_names_the_file(tiny_bert: str, tmp_path: pathlib.Path) -> None:
    import torch
    from safetensors.torch import load_file

    model_dir = _model_copy(tiny_bert, tmp_path)
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    weights = model_dir / "pytorch_model.bin"
    torch.save(state, weights)
    assert load_sequence_classifier(str(model_dir), 3, seed=0) is not None  # the intact .bin loads
    intact = weights.read_bytes()
    for damaged in (intact[:5000], intact[:-100], b"garbage" * 100):
        weights.write_bytes(damaged)
        with pytest.raises(ModelError, match=rf"weights file {weights} is corrupt or truncated") as info:
            load_sequence_classifier(str(model_dir), 3, seed=0)
        assert "weights_only" not in str(info.value)  # no advice to unpickle an untrusted file


def test_missing_weights_and_corrupt_config(tiny_bert: str, tmp_path: pathlib.Path) -> None:
    model_dir = _model_copy(tiny_bert, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(
        ModelError, match=r"has no weights file \(model.safetensors or pytorch_model.bin\).*config.json"
    ):
        load_sequence_classifier(str(model_dir), 3, seed=0)
    model_dir = _model_copy(tiny_bert, tmp_path, "bad-config")
    config = model_dir / "config.json"
    config.write_text(config.read_text()[:40])
    for load in (lambda: load_sequence_classifier(str(model_dir), 3, seed=0), lambda: load_tokenizer(str(model_dir))):
        with pytest.raises(ModelError, match=rf"{config} of model .* is not valid JSON \(line \d+, column \d+"):
            load()
    config.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ModelError, match=rf"configuration of model .*\({config}\).*model_type"):
        load_sequence_classifier(str(model_dir), 3, seed=0)


def test_weights_of_another_model_are_rejected(tiny_bert: str, tiny_gpt2: str, tmp_path: pathlib.Path) -> None:
    model_dir = _model_copy(tiny_bert, tmp_path)
    shutil.copy(pathlib.Path(tiny_gpt2) / "model.safetensors", model_dir / "model.safetensors")
    with pytest.raises(ModelError, match=r"do not fit its config.json: .* base-model weights \(100% .*another model"):
        load_sequence_classifier(str(model_dir), 3, seed=0)


def test_directory_without_tokenizer_files_says_which_are_missing(tiny_bert: str, tmp_path: pathlib.Path) -> None:
    model_dir = _model_copy(tiny_bert, tmp_path)
    (model_dir / "tokenizer.json").unlink()  # tokenizer_config.json alone is not a tokenizer
    with pytest.raises(ModelError) as info:
        load_tokenizer(str(model_dir))
    message = str(info.value)
    assert f"model directory {model_dir} has no tokenizer files" in message
    assert (
        "tokenizer.json, vocab.txt" in message
        and "It holds: config.json, model.safetensors, tokenizer_config" in message
    )


def test_tokenizer_that_does_not_fit_the_model(tiny_bert: str, tmp_path: pathlib.Path) -> None:
    model_dir = _model_copy(tiny_bert, tmp_path)
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "zorp", "blix"]))
    with pytest.raises(
        ModelError, match=r"tokenizer of '.*' maps 100% of the tokens of ordinary English text to \[UNK\]"
    ):
        load_tokenizer(str(model_dir))
    # a vocabulary larger than the model's embedding would crash training with an IndexError
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    shutil.copy(pathlib.Path(tiny_bert) / "tokenizer.json", model_dir / "tokenizer.json")
    (model_dir / "vocab.txt").unlink()
    with pytest.raises(ModelError, match=r"has 30522 tokens but the model's config.json has vocab_size=100"):
        load_tokenizer(str(model_dir))


def test_check_tokenizer_on_the_dataset_texts(tiny_bert: str) -> None:
    tokenizer = load_tokenizer(tiny_bert)  # the intact tokenizer passes the built-in check
    check_tokenizer(tokenizer, ["A dog barks.", "The river is wide."], model="tiny")
    with pytest.raises(ModelError, match=r"tokenizer of 'tiny' maps 100% of the tokens of the dataset's texts to"):
        check_tokenizer(tokenizer, ["\U0001f642\U0001f643 \U0001f916", "\u16a0\u16a2\u16a6 \u16a8\u16b1"], model="tiny")
