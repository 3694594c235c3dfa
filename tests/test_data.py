"""Tests of fedlora's data layer: the shipped WordNet table, local loading and federated partitioning."""

from __future__ import annotations

import collections
import gzip
import json
import math
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from fedlora.data import (
    DEFAULT_DATASET,
    DEFAULT_LABELS,
    DataError,
    FederatedData,
    default_dataset_path,
    label_histogram,
    load_table,
    parse_partition,
    prepare_federated_data,
)

DEFAULT_TASK = dict(labels=DEFAULT_LABELS, max_examples_per_label=500)


def _rows(data: FederatedData) -> list[list[tuple[str, int]]]:
    """Per client (then the global test set), the (text, label) rows of train + test, in order."""
    parts = [
        list(zip(c.train["text"], c.train["label"], strict=True))
        + list(zip(c.test["text"], c.test["label"], strict=True))
        for c in data.clients
    ]
    return [*parts, list(zip(data.test["text"], data.test["label"], strict=True))]


def _filtered(table: pa.Table, labels: tuple[str, ...]) -> collections.Counter[tuple[str, str]]:
    """Multiset of (text, label) rows of the shipped table whose label is one of ``labels``."""
    kept = table.filter(pc.is_in(table.column("label"), pa.array(labels)))
    return collections.Counter(zip(kept.column("text").to_pylist(), kept.column("label").to_pylist(), strict=True))


def _named_multiset(data: FederatedData) -> collections.Counter[tuple[str, str]]:
    return collections.Counter((text, data.label_names[label]) for part in _rows(data) for text, label in part)


def _client_label_sets(data: FederatedData) -> list[set[int]]:
    return [set(c.train["label"]) | set(c.test["label"]) for c in data.clients]


def _mean_entropy(histogram: list[list[int]]) -> float:
    entropies = []
    for counts in histogram:
        p = np.asarray(counts, dtype=float)
        p = p[p > 0] / p.sum()
        entropies.append(float(-(p * np.log(p)).sum()))
    return float(np.mean(entropies))


@pytest.fixture(scope="module")
def wordnet_table() -> pa.Table:
    return pq.read_table(default_dataset_path())


@pytest.fixture(scope="module")
def default_data() -> FederatedData:
    return prepare_federated_data(num_clients=8, partition="dirichlet:0.5", seed=0, **DEFAULT_TASK)


def _write_toy(path: pathlib.Path, n_users: int = 4, per_user: int = 30) -> list[dict[str, object]]:
    """A small table: text names its user and label; three string labels; integer column ``num``."""
    rows: list[dict[str, object]] = []
    for u in range(n_users):
        for i in range(per_user):
            label = ("cat", "car", "food")[(i + u) % 3]
            rows.append({"text": f"user{u} says {label} #{i}", "label": label, "user": f"u{u}", "num": i % 3})
    suffixes = "".join(path.suffixes)
    if suffixes == ".csv":
        pa_csv.write_csv(pa.Table.from_pylist(rows), path)
    elif suffixes == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif suffixes == ".json":
        path.write_text(json.dumps(rows))
    elif suffixes in (".jsonl", ".jsonl.gz"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
        if suffixes.endswith(".gz"):
            with gzip.open(path, "wt", encoding="utf-8") as handle:
                handle.write(text)
        else:
            path.write_text(text)
    else:  # pragma: no cover - test helper misuse
        raise AssertionError(path)
    return rows


# ----------------------------------------------------------------------------------- shipped dataset


def test_shipped_parquet_has_expected_content(wordnet_table: pa.Table) -> None:
    path = default_dataset_path()
    assert path.name == "wordnet_supersenses.parquet"
    assert path.stat().st_size < 8_000_000
    assert (path.parent / "WORDNET_LICENSE.txt").read_text().startswith("This software and database")
    assert wordnet_table.column_names == ["synset", "pos", "label", "lemmas", "text", "examples"]
    pos = collections.Counter(wordnet_table.column("pos").to_pylist())
    assert set(pos) == {"noun", "verb", "adj", "adv"}
    assert pos["noun"] > 80_000
    labels = collections.Counter(wordnet_table.column("label").to_pylist())
    assert len(labels) == 45
    assert all(labels[label] >= 1000 for label in DEFAULT_LABELS)
    rows = {r["synset"]: r for r in wordnet_table.slice(0).to_pylist()}
    dog = rows["02084071-n"]
    assert dog["label"] == "noun.animal"
    assert dog["lemmas"].startswith("dog, domestic dog, Canis familiaris")
    assert dog["text"].startswith("a member of the genus Canis")
    assert "the dog barked all night" in dog["examples"]
    assert '"' not in dog["text"]
    assert "(a)" not in rows["00020103-s"]["lemmas"]  # "outback(a)" -> "outback"
    assert rows["00020103-s"]["pos"] == "adj"


def test_load_table_default_returns_dataset() -> None:
    dataset = load_table(DEFAULT_DATASET)
    assert {"text", "label", "lemmas"} <= set(dataset.column_names)
    assert dataset.num_rows > 100_000


# --------------------------------------------------------------------------------- partition specs


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", ("iid", None)),
        ("dirichlet:0.5", ("dirichlet", 0.5)),
        ("dirichlet:2", ("dirichlet", 2.0)),
        ("pathological:2", ("pathological", 2)),
        ("natural:user_id", ("natural", "user_id")),
    ],
)
def test_parse_partition_accepts(spec: str, expected: tuple[str, object]) -> None:
    assert parse_partition(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "random",
        "iid:3",
        "dirichlet",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:x",
        "dirichlet:nan",
        "pathological:0",
        "pathological:1.5",
        "natural:",
        "shards:2",
    ],
)
def test_parse_partition_rejects(spec: str) -> None:
    with pytest.raises(DataError, match="Allowed forms: iid, dirichlet"):
        parse_partition(spec)


# ------------------------------------------------------------------------------- default task


def test_default_task_covers_selected_data_exactly_once(default_data: FederatedData, wordnet_table: pa.Table) -> None:
    assert default_data.label_names == sorted(DEFAULT_LABELS)
    assert len(default_data.clients) == 8
    assert [c.client_id for c in default_data.clients] == list(range(8))
    for dataset in [
        default_data.test,
        *(c.train for c in default_data.clients),
        *(c.test for c in default_data.clients),
    ]:
        assert dataset.column_names == ["text", "label"]
    for client in default_data.clients:
        assert len(client.train) >= 2 and len(client.test) >= 1
        assert all(0 <= label < 8 for label in client.train["label"])
        # client test fraction 0.2 (rounded) of the client's data
        assert len(client.test) == max(1, math.floor(0.2 * (len(client.train) + len(client.test)) + 0.5))
    union = _named_multiset(default_data)
    assert sum(union.values()) == 8 * 500
    assert collections.Counter(label for _, label in union.elements()) == {label: 500 for label in DEFAULT_LABELS}
    assert not union - _filtered(
        wordnet_table, DEFAULT_LABELS
    )  # every row comes from the filtered data, none is used twice
    # global test: 10 %, stratified
    assert collections.Counter(default_data.test["label"]) == {i: 50 for i in range(8)}


def test_union_equals_filtered_data_without_cap(wordnet_table: pa.Table) -> None:
    labels = ("noun.time", "noun.body", "noun.shape")
    data = prepare_federated_data(num_clients=5, partition="dirichlet:0.5", labels=labels, seed=3)
    assert data.label_names == ["noun.body", "noun.shape", "noun.time"]
    assert _named_multiset(data) == _filtered(wordnet_table, labels)


def test_same_seed_reproduces_and_other_seed_differs(default_data: FederatedData) -> None:
    again = prepare_federated_data(num_clients=8, partition="dirichlet:0.5", seed=0, **DEFAULT_TASK)
    other = prepare_federated_data(num_clients=8, partition="dirichlet:0.5", seed=1, **DEFAULT_TASK)
    assert _rows(again) == _rows(default_data)
    assert [list(c.train["text"]) for c in again.clients] == [list(c.train["text"]) for c in default_data.clients]
    assert _rows(other) != _rows(default_data)
    assert label_histogram(other) != label_histogram(default_data)
    assert list(other.test["text"]) != list(default_data.test["text"])


def test_iid_gives_equal_sizes_and_balanced_labels() -> None:
    data = prepare_federated_data(num_clients=8, partition="iid", seed=0, **DEFAULT_TASK)
    sizes = [len(c.train) + len(c.test) for c in data.clients]
    assert sum(sizes) == 3600 and max(sizes) - min(sizes) <= 1
    for counts in label_histogram(data):
        assert min(counts) >= 15  # expected 36 per label and client; no label missing anywhere


def test_pathological_limits_labels_per_client() -> None:
    data = prepare_federated_data(num_clients=8, partition="pathological:2", seed=0, **DEFAULT_TASK)
    label_sets = _client_label_sets(data)
    assert all(1 <= len(labels) <= 2 for labels in label_sets)
    assert set().union(*label_sets) == set(range(8))  # every label reaches some client


def test_small_alpha_is_more_skewed_than_iid() -> None:
    task = dict(labels=DEFAULT_LABELS, max_examples_per_label=300, seed=0, num_clients=8)
    iid = _mean_entropy(label_histogram(prepare_federated_data(partition="iid", **task)))
    skewed = _mean_entropy(label_histogram(prepare_federated_data(partition="dirichlet:0.1", **task)))
    assert iid > 0.95 * math.log(8)
    assert skewed < iid - 0.5


def test_label_histogram_matches_train_sets(default_data: FederatedData) -> None:
    histogram = label_histogram(default_data)
    assert len(histogram) == 8 and all(len(row) == 8 for row in histogram)
    for counts, client in zip(histogram, default_data.clients, strict=True):
        assert counts == [list(client.train["label"]).count(i) for i in range(8)]


# ------------------------------------------------------------------------------- local files


@pytest.mark.parametrize("name", ["toy.csv", "toy.json", "toy.jsonl", "toy.jsonl.gz", "toy.parquet"])
def test_load_local_files(tmp_path: pathlib.Path, name: str) -> None:
    rows = _write_toy(tmp_path / name)
    dataset = load_table(str(tmp_path / name))
    assert set(dataset.column_names) == {"text", "label", "user", "num"}
    assert list(dataset["text"]) == [r["text"] for r in rows]
    assert list(dataset["label"]) == [r["label"] for r in rows]


def test_natural_partition_on_local_csv(tmp_path: pathlib.Path) -> None:
    _write_toy(tmp_path / "toy.csv", n_users=4, per_user=30)
    data = prepare_federated_data(str(tmp_path / "toy.csv"), num_clients=4, partition="natural:user", seed=0)
    assert data.label_names == ["car", "cat", "food"]
    assert len(data.test) == 12
    for client_id, client in enumerate(data.clients):
        texts = list(client.train["text"]) + list(client.test["text"])
        assert {t.split()[0] for t in texts} == {f"user{client_id}"}
        assert client.train.column_names == ["text", "label"]
    total = sum(len(c.train) + len(c.test) for c in data.clients) + len(data.test)
    assert total == 120


def test_integer_labels_keep_their_values(tmp_path: pathlib.Path) -> None:
    _write_toy(tmp_path / "toy.csv")
    data = prepare_federated_data(
        str(tmp_path / "toy.csv"),
        num_clients=2,
        partition="iid",
        label_column="num",
        global_test_fraction=0.0,
    )
    assert data.label_names == ["0", "1", "2"]
    assert len(data.test) == 0
    for client in data.clients:
        for text, label in zip(client.train["text"], client.train["label"], strict=True):
            assert int(text.split("#")[1]) % 3 == label


# ------------------------------------------------------------------------------------- errors


def test_unknown_partition_spec_is_rejected() -> None:
    with pytest.raises(DataError, match="Allowed forms"):
        prepare_federated_data(num_clients=4, partition="shards:3", **DEFAULT_TASK)


def test_bad_column_lists_available_columns() -> None:
    with pytest.raises(DataError, match="no text column 'definition'") as info:
        prepare_federated_data(num_clients=4, text_column="definition", **DEFAULT_TASK)
    assert "'lemmas'" in str(info.value) and "'examples'" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_label_is_named_with_existing_ones() -> None:
    with pytest.raises(DataError, match="'noun.unicorn'") as info:
        prepare_federated_data(num_clients=4, labels=["noun.animal", "noun.unicorn"])
    assert "noun.artifact" in str(info.value)
    assert "noun.animal'" not in str(info.value).split("do not occur")[0]


def test_natural_partition_with_wrong_client_count(tmp_path: pathlib.Path) -> None:
    _write_toy(tmp_path / "toy.csv", n_users=4)
    with pytest.raises(DataError, match=r"has 4 .*num_clients=3"):
        prepare_federated_data(str(tmp_path / "toy.csv"), num_clients=3, partition="natural:user")
    with pytest.raises(DataError, match="'nope'.*Available columns"):
        prepare_federated_data(str(tmp_path / "toy.csv"), num_clients=3, partition="natural:nope")


def test_partition_leaving_a_client_almost_empty(tmp_path: pathlib.Path) -> None:
    # Label "rare" has 2 examples; pathological:1 gives it to clients 1 and 3 with one example each.
    rows = [{"text": f"common {i}", "label": "common"} for i in range(100)]
    rows += [{"text": f"rare {i}", "label": "rare"} for i in range(2)]
    path = tmp_path / "skewed.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"client 1 with 1 examples.*0 training examples.*fewer clients"):
        prepare_federated_data(str(path), num_clients=4, partition="pathological:1", global_test_fraction=0.0)


def test_too_many_clients_for_the_data(tmp_path: pathlib.Path) -> None:
    _write_toy(tmp_path / "toy.csv", n_users=1, per_user=50)
    with pytest.raises(DataError, match="too few for 40 clients"):
        prepare_federated_data(str(tmp_path / "toy.csv"), num_clients=40, partition="pathological:1")


def test_impossible_dirichlet_partition(tmp_path: pathlib.Path) -> None:
    _write_toy(tmp_path / "toy.csv", n_users=4, per_user=30)
    with pytest.raises(DataError, match="Dirichlet partition.*larger alpha"):
        prepare_federated_data(str(tmp_path / "toy.csv"), num_clients=10, partition="dirichlet:0.01")


def test_missing_local_file(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_table(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="does not exist"):
        prepare_federated_data(str(tmp_path / "missing.jsonl"), num_clients=2)
