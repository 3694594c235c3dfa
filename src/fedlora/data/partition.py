"""Turning a classification table into federated client datasets.

:func:`prepare_federated_data` loads a table (:func:`fedlora.data.loading.load_table`), optionally keeps a
subset of labels and caps the examples per label, encodes the labels as integers, holds out a stratified
global test set, partitions the rest among clients with the partitioners of ``flwr-datasets`` and finally
splits every client's data into a local train and test set.  Every random choice is derived from ``seed``,
so the same arguments always give exactly the same splits.

Partition specs (see :func:`parse_partition`):

* ``iid`` -- shuffled equal shards (``IidPartitioner``);
* ``dirichlet:<alpha>`` -- label skew drawn from Dir(alpha) per label (``DirichletPartitioner``);
* ``pathological:<k>`` -- every client sees only ``k`` labels (``PathologicalPartitioner``);
* ``natural:<column>`` -- one client per distinct value of ``column`` (``NaturalIdPartitioner``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    PathologicalPartitioner,
)
from flwr_datasets.partitioner import Partitioner as _FlwrPartitioner

from fedlora.data.loading import DataError, check_columns, load_table

__all__ = [
    "ClientData",
    "FederatedData",
    "label_histogram",
    "parse_partition",
    "prepare_federated_data",
]

PARTITION_FORMS = ("iid", "dirichlet:<alpha > 0>", "pathological:<k >= 1>", "natural:<column>")

_ROW = "__fedlora_row__"
# Independent random streams derived from the user seed, one per step.
_STREAM_SUBSAMPLE, _STREAM_GLOBAL_TEST, _STREAM_POOL, _STREAM_CLIENT = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class ClientData:
    """The local data of one client.

    Attributes:
        client_id: index of the client, ``0 .. num_clients - 1``.
        train: local training set with columns ``text`` (str) and ``label`` (int in ``[0, num_labels)``).
        test: local test set with the same columns; empty only if ``client_test_fraction`` was 0.
    """

    client_id: int
    train: datasets.Dataset
    test: datasets.Dataset


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Client datasets plus the global held-out test set.

    Attributes:
        clients: one :class:`ClientData` per client, ordered by ``client_id``.
        test: global held-out test set (columns ``text``, ``label``), stratified by label.
        label_names: ``label_names[i]`` is the original label value (as a string) encoded as ``i``.
    """

    clients: list[ClientData]
    test: datasets.Dataset
    label_names: list[str]

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)


def parse_partition(spec: str) -> tuple[str, str | float | int | None]:
    """Parse a partition spec.

    ``"iid"`` -> ``("iid", None)``; ``"dirichlet:0.5"`` -> ``("dirichlet", 0.5)`` (alpha > 0);
    ``"pathological:2"`` -> ``("pathological", 2)`` (integer >= 1);
    ``"natural:user"`` -> ``("natural", "user")``.

    Raises:
        DataError: for anything else; the message lists the allowed forms.
    """

    def bad(reason: str) -> DataError:
        return DataError(f"Invalid partition {spec!r}: {reason}. Allowed forms: {', '.join(PARTITION_FORMS)}.")

    if not isinstance(spec, str):
        raise bad("not a string")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    if kind == "iid":
        if sep:
            raise bad("'iid' takes no argument")
        return "iid", None
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise bad(f"alpha {arg!r} is not a number") from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise bad(f"alpha must be a finite number > 0, got {arg!r}")
        return "dirichlet", alpha
    if kind == "pathological":
        try:
            k = int(arg)
        except ValueError:
            raise bad(f"the number of labels per client {arg!r} is not an integer") from None
        if k < 1:
            raise bad(f"the number of labels per client must be >= 1, got {k}")
        return "pathological", k
    if kind == "natural":
        if not arg:
            raise bad("name the column whose values identify the clients, e.g. 'natural:user_id'")
        return "natural", arg
    raise bad(f"unknown partition kind {kind!r}" if kind else "empty spec")


def prepare_federated_data(
    source: str = "default",
    *,
    num_clients: int,
    partition: str = "dirichlet:0.5",
    split: str = "train",
    config_name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    labels: Sequence[str] | None = None,
    max_examples_per_label: int | None = None,
    global_test_fraction: float = 0.1,
    client_test_fraction: float = 0.2,
    seed: int = 0,
    min_client_examples: int = 2,
    extra_columns: Mapping[str, str] | None = None,
) -> FederatedData:
    """Load ``source`` and split it into per-client train/test sets plus a global test set.

    Args:
        source: see :func:`fedlora.data.loading.load_table` (``"default"``, a local file or a hub id).
        num_clients: number of clients; for ``natural:<column>`` it must equal the number of distinct values.
        partition: partition spec, see :func:`parse_partition`.
        split, config_name, text_column, label_column: passed to ``load_table``.
        labels: keep only rows whose label (as a string) is one of these.
        max_examples_per_label: keep at most this many rows per label (seeded random choice).
        global_test_fraction: fraction of rows held out (stratified by label) as the global test set.
        client_test_fraction: fraction of each client's rows used as its local test set.
        seed: seed of every random choice; the same seed reproduces every split exactly.
        min_client_examples: minimum size of every client's local training set.
        extra_columns: more text columns to carry along, ``{name in the result: column of the source}`` (e.g. the
            causal-LM task's ``{"response": response_column}``); rows where one is missing or blank are dropped.

    Returns:
        The :class:`FederatedData`; all datasets have exactly the columns ``text`` and ``label`` (and the
        ``extra_columns``).

    Raises:
        DataError: bad arguments, unloadable data, unknown labels, or a partition that leaves a client with
            fewer than ``min_client_examples`` training examples.
    """
    _check_arguments(
        num_clients=num_clients,
        max_examples_per_label=max_examples_per_label,
        global_test_fraction=global_test_fraction,
        client_test_fraction=client_test_fraction,
        seed=seed,
        min_client_examples=min_client_examples,
    )
    check_columns(text_column, label_column)
    kind, arg = parse_partition(partition)
    natural_column = arg if kind == "natural" else None
    assert natural_column is None or isinstance(natural_column, str)

    dataset = load_table(
        source, split=split, config_name=config_name, text_column=text_column, label_column=label_column
    )
    if natural_column is not None and natural_column not in dataset.column_names:
        raise DataError(
            f"Partition {partition!r} needs column {natural_column!r}, which {source!r} does not have. "
            f"Available columns: {', '.join(map(repr, dataset.column_names))}."
        )
    extra = _extra_columns(dataset, extra_columns, source)
    label_feature = dataset.features[label_column]
    class_names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    wanted = [text_column, label_column]
    for column in [natural_column, *extra.values()]:
        if column is not None and column not in wanted:
            wanted.append(column)
    table = dataset.select_columns(wanted).with_format("arrow")[:]

    table = _drop_unusable_rows(table, text_column, label_column, source)
    for name, column in extra.items():
        table = _drop_blank_rows(table, column, name, source)
    texts = table.column(text_column)
    codes, label_names = _encode_labels(table.column(label_column), label_column, class_names)
    natural_ids = None
    if natural_column is not None:
        natural_ids = _natural_id_column(table.column(natural_column), natural_column)

    keep = np.arange(len(codes))
    if labels is not None:
        codes, label_names, keep = _select_labels(codes, label_names, labels, label_column, source)
    else:
        _check_labels_are_classes(codes, label_names, label_column, source)
    if max_examples_per_label is not None:
        rng = np.random.default_rng([seed, _STREAM_SUBSAMPLE])
        keep = _cap_per_label(codes, keep, max_examples_per_label, rng)
    codes = codes[keep]
    if len(label_names) < 2:
        raise DataError(
            f"Classification needs at least 2 distinct labels, but the selected data of {source!r} has "
            f"{len(label_names)} ({', '.join(label_names) or 'none'}). Select more labels."
        )

    columns = {"text": texts.take(pa.array(keep)), "label": pa.array(codes, type=pa.int64())}
    columns.update({name: table.column(column).take(pa.array(keep)) for name, column in extra.items()})
    data = pa.table(columns)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=label_names),
            **{name: datasets.Value("string") for name in extra},
        }
    )

    # Global held-out test set, stratified by label.
    rng = np.random.default_rng([seed, _STREAM_GLOBAL_TEST])
    n_global_test = _round(global_test_fraction * len(codes))
    pool, global_test = _stratified_split(np.arange(len(codes)), codes, n_global_test, rng)
    # Shuffle the pool: flwr-datasets' IidPartitioner shards contiguously and the label-based partitioners
    # split each label's rows in dataset order, so the row order must not carry information.
    pool = np.random.default_rng([seed, _STREAM_POOL]).permutation(pool)

    if natural_column is not None:
        assert natural_ids is not None
        natural_ids = natural_ids.take(pa.array(keep))
        client_rows = _natural_partition(natural_ids, pool, num_clients, natural_column)
    else:
        client_rows = _label_partition(
            kind, arg, codes, pool, num_clients, seed, client_test_fraction, min_client_examples, label_names
        )

    clients = []
    for client_id, rows in enumerate(client_rows):
        rng = np.random.default_rng([seed, _STREAM_CLIENT, client_id])
        n_test = _client_test_size(len(rows), client_test_fraction)
        train_rows, test_rows = _stratified_split(rows, codes, n_test, rng)
        if len(train_rows) < min_client_examples:
            raise DataError(
                f"Partition {partition!r} leaves client {client_id} with {len(rows)} examples, i.e. "
                f"{len(train_rows)} training examples after its local test split (fraction "
                f"{client_test_fraction}), fewer than min_client_examples={min_client_examples}. Use fewer "
                "clients, a larger Dirichlet alpha, another partition (e.g. 'iid'), or more data per label."
            )
        clients.append(
            ClientData(
                client_id=client_id,
                train=_make_dataset(data, train_rows, features),
                test=_make_dataset(data, test_rows, features),
            )
        )
    if kind == "pathological":
        _warn_unused_labels(clients, label_names, partition)
    return FederatedData(
        clients=clients, test=_make_dataset(data, global_test, features), label_names=list(label_names)
    )


def label_histogram(data: FederatedData) -> list[list[int]]:
    """Per client, the number of training examples of every label (``[client][label]``)."""
    num_labels = len(data.label_names)
    return [_label_counts(client.train, num_labels).tolist() for client in data.clients]


# --------------------------------------------------------------------------------------------- helpers


def _check_arguments(
    *,
    num_clients: int,
    max_examples_per_label: int | None,
    global_test_fraction: float,
    client_test_fraction: float,
    seed: int,
    min_client_examples: int,
) -> None:
    def is_int(value: object) -> bool:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)

    if not is_int(num_clients) or num_clients < 1:
        raise DataError(f"num_clients must be an integer >= 1, got {num_clients!r}.")
    if max_examples_per_label is not None and (not is_int(max_examples_per_label) or max_examples_per_label < 1):
        raise DataError(f"max_examples_per_label must be None or an integer >= 1, got {max_examples_per_label!r}.")
    for name, value in (
        ("global_test_fraction", global_test_fraction),
        ("client_test_fraction", client_test_fraction),
    ):
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
            raise DataError(f"{name} must be a number in [0, 1), got {value!r}.")
    if not is_int(seed) or seed < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed!r}.")
    if not is_int(min_client_examples) or min_client_examples < 1:
        raise DataError(f"min_client_examples must be an integer >= 1, got {min_client_examples!r}.")


def _round(x: float) -> int:
    """Round half up (Python's round() rounds half to even)."""
    return int(math.floor(x + 0.5))


def _client_test_size(n: int, fraction: float) -> int:
    """Size of a client's local test set: about ``fraction * n``, at least 1 if ``fraction > 0``."""
    if fraction <= 0 or n == 0:
        return 0
    return min(n, max(1, _round(fraction * n)))


def _drop_unusable_rows(table: pa.Table, text_column: str, label_column: str, source: str) -> pa.Table:
    """Make the text column strings and drop (with a warning) the rows without a label or a non-blank text.

    Raises:
        DataError: a column is empty in every row, the text column does not hold text, or no row is left.
    """
    for role, name in (("text", text_column), ("label", label_column)):
        column = table.column(name)
        if column.null_count == len(column):
            raise DataError(
                f"The {role} column {name!r} of {source!r} is empty (null) in all {len(column)} rows. "
                f"Check the file, or name another column with {role}_column=."
            )
    texts = _as_string_column(table.column(text_column), text_column, source)
    table = table.set_column(table.column_names.index(text_column), text_column, texts)
    has_label = pc.is_valid(table.column(label_column))
    has_text = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0), False)
    kept = table.filter(pc.and_(has_label, has_text))
    dropped = table.num_rows - kept.num_rows
    if dropped:
        no_label = len(has_label) - pc.sum(has_label).as_py()
        no_text = len(has_text) - pc.sum(has_text).as_py()
        warnings.warn(
            f"Dropped {dropped} of {table.num_rows} rows of {source!r}: {no_label} without a {label_column!r} "
            f"value, {no_text} with a missing or blank {text_column!r}.",
            stacklevel=3,
        )
    if kept.num_rows == 0:
        raise DataError(
            f"{source!r} has no rows with both a label in {label_column!r} and a non-blank text in {text_column!r}."
        )
    return kept


def _extra_columns(dataset: datasets.Dataset, extra_columns: Mapping[str, str] | None, source: str) -> dict[str, str]:
    """``extra_columns`` as a dict, after checking that ``dataset`` has every one of them (the error names each
    missing column by its role and lists the columns there are)."""
    extra = dict(extra_columns or {})
    absent = [column for column in extra.values() if column not in dataset.column_names]
    if absent:
        roles = ", ".join(f"{name} column {column!r}" for name, column in extra.items() if column in absent)
        raise DataError(
            f"{source!r} has no {roles}. Available columns: {', '.join(map(repr, dataset.column_names))}. Choose "
            "the right one (e.g. --response-column)."
        )
    return extra


def _drop_blank_rows(table: pa.Table, column: str, role: str, source: str) -> pa.Table:
    """Make ``column`` strings and drop (with a warning) the rows where it is missing or blank."""
    values = _as_string_column(table.column(column), column, source)
    table = table.set_column(table.column_names.index(column), column, values)
    present = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0), False)
    kept = table.filter(present)
    if kept.num_rows == 0:
        raise DataError(f"The {role} column {column!r} of {source!r} is missing or blank in every row.")
    if kept.num_rows < table.num_rows:
        warnings.warn(
            f"Dropped {table.num_rows - kept.num_rows} of {table.num_rows} rows of {source!r} with a missing or "
            f"blank {role} column {column!r}.",
            stacklevel=3,
        )
    return kept


def _as_string_column(column: pa.ChunkedArray, name: str, source: str) -> pa.ChunkedArray:
    if pa.types.is_string(column.type):
        return column
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        what = "numbers"
    elif pa.types.is_boolean(kind):
        what = "booleans"
    else:
        what = None
    if what is not None:
        examples = ", ".join(map(repr, column.drop_null().slice(0, 3).to_pylist()))
        raise DataError(
            f"The text column {name!r} of {source!r} holds {what} ({kind}, e.g. {examples}), not text. "
            "Name the column of texts with text_column= (--text-column)."
        )
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(
            f"Text column {name!r} of {source!r} has type {column.type}, which cannot be used as text; pick a "
            "column of strings with text_column=."
        ) from exc


def _check_labels_are_classes(codes: np.ndarray, names: list[str], column: str, source: str) -> None:
    """Reject a label column with fewer than two rows per distinct value on average (a text or id column)."""
    if len(names) > 2 and 2 * len(names) > len(codes):
        shown = ", ".join(map(repr, names[:5])) + (", ..." if len(names) > 5 else "")
        raise DataError(
            f"The label column {column!r} of {source!r} has {len(names)} distinct values in {len(codes)} rows "
            f"({shown}): fewer than 2 examples per label, so there is nothing to learn. It looks like a text or "
            "id column; name the column of class labels with label_column= (--label-column)."
        )


def _encode_labels(column: pa.ChunkedArray, name: str, class_names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Encode labels as ``0..L-1`` in sorted order of their values; return codes and display names.

    Integer labels are sorted numerically (so labels ``0..L-1`` keep their values) and shown as ``str(value)``
    (or as the ``ClassLabel`` name if the column has one); all other labels are compared as strings.
    """
    integral = pa.types.is_floating(column.type) and pc.all(pc.is_finite(column)).as_py()
    if integral and pc.all(pc.equal(pc.floor(column), column)).as_py():
        column = pc.cast(column, pa.int64())  # 0.0, 1.0, ... (e.g. a CSV column with gaps): labels 0, 1, ...
    if pa.types.is_integer(column.type):
        values = column
    else:
        try:
            values = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise DataError(
                f"Label column {name!r} has type {column.type}; labels must be scalars (strings or numbers). "
                "Pick another column with label_column=."
            ) from exc
    encoded = pc.dictionary_encode(values.combine_chunks())
    dictionary = encoded.dictionary.to_pylist()
    order = sorted(range(len(dictionary)), key=lambda i: dictionary[i])
    rank = np.empty(len(dictionary), dtype=np.int64)
    rank[order] = np.arange(len(dictionary))
    codes = rank[encoded.indices.to_numpy(zero_copy_only=False)]
    names = []
    for i in order:
        value = dictionary[i]
        if class_names is not None and isinstance(value, int) and 0 <= value < len(class_names):
            names.append(str(class_names[value]))
        else:
            names.append(str(value))
    if len(set(names)) != len(names):
        raise DataError(f"Label column {name!r} has distinct values that print the same: {names}.")
    return codes, names


def _select_labels(
    codes: np.ndarray, names: list[str], labels: Sequence[str], column: str, source: str
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Keep the rows of the given labels; re-encode so that the kept labels are ``0..K-1``."""
    if isinstance(labels, str):
        labels = [labels]
    wanted = list(dict.fromkeys(str(label) for label in labels))
    if not wanted:
        raise DataError("labels= is empty; give at least two label values or None for all labels.")
    index = {name: i for i, name in enumerate(names)}
    unknown = [label for label in wanted if label not in index]
    if unknown:
        counts = np.bincount(codes, minlength=len(names))
        common = [names[i] for i in np.argsort(-counts, kind="stable")[:20]]
        more = f" (and {len(names) - len(common)} more)" if len(names) > len(common) else ""
        raise DataError(
            f"Label(s) {', '.join(map(repr, unknown))} do not occur in column {column!r} of {source!r}. "
            f"It has {len(names)} distinct labels, e.g. {', '.join(map(repr, common))}{more}."
        )
    selected = sorted(index[label] for label in wanted)  # keep the sorted-value order of label_names
    new_code = np.full(len(names), -1, dtype=np.int64)
    new_code[selected] = np.arange(len(selected))
    recoded = new_code[codes]
    keep = np.flatnonzero(recoded >= 0)
    return recoded, [names[i] for i in selected], keep


def _cap_per_label(codes: np.ndarray, keep: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Keep at most ``cap`` randomly chosen rows per label (rows stay in their original order)."""
    chosen = []
    kept_codes = codes[keep]
    for label in np.unique(kept_codes):
        rows = keep[kept_codes == label]
        if len(rows) > cap:
            rows = rng.permutation(rows)[:cap]
        chosen.append(rows)
    return np.sort(np.concatenate(chosen)) if chosen else keep


def _stratified_split(
    rows: np.ndarray, codes: np.ndarray, n_test: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (train, test) with ``len(test) == n_test``, stratified by label.

    Each label gets ``floor(share)`` test rows of its exact share; the remaining test rows go to the labels
    with the largest remainders.  Both outputs are shuffled.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if n_test <= 0:
        return rng.permutation(rows), rows[:0]
    if n_test >= len(rows):
        return rows[:0], rng.permutation(rows)
    row_codes = codes[rows]
    labels, counts = np.unique(row_codes, return_counts=True)
    quota = counts * (n_test / len(rows))
    take = np.floor(quota).astype(np.int64)
    extra = n_test - int(take.sum())
    if extra > 0:
        remainder = quota - take
        # Largest remainders first; ties broken randomly so no label is systematically favoured.
        order = np.lexsort((rng.random(len(labels)), -remainder))
        take[order[:extra]] += 1
    train, test = [], []
    for label, n in zip(labels, take, strict=True):
        label_rows = rng.permutation(rows[row_codes == label])
        test.append(label_rows[:n])
        train.append(label_rows[n:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _natural_id_column(column: pa.ChunkedArray, name: str) -> pa.Array:
    if column.null_count:
        raise DataError(
            f"Column {name!r} has {column.null_count} missing values; a natural partition needs a client id "
            "in every row. Fill or drop them first."
        )
    if pa.types.is_integer(column.type) or pa.types.is_string(column.type):
        return column.combine_chunks()
    try:
        return pc.cast(column, pa.string()).combine_chunks()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(
            f"Column {name!r} has type {column.type}; natural partition ids must be strings or numbers."
        ) from exc


def _run_partitioner(partitioner: _FlwrPartitioner, table: pa.Table, describe: str, hint: str) -> list[np.ndarray]:
    """Assign ``table`` (which has a row-number column) to ``partitioner`` and read back every partition."""
    partitioner.dataset = datasets.Dataset(InMemoryTable(table))
    try:
        with warnings.catch_warnings():
            # DirichletPartitioner warns on every failed attempt to meet min_partition_size and
            # PathologicalPartitioner about unused labels; both are handled (and reported) by the caller.
            warnings.simplefilter("ignore", UserWarning)
            return [
                partitioner.load_partition(pid).with_format("arrow")[_ROW].to_numpy()
                for pid in range(partitioner.num_partitions)
            ]
    except ValueError as exc:
        raise DataError(f"Cannot create the {describe}: {exc} {hint}") from exc


def _label_partition(
    kind: str,
    arg: str | float | int | None,
    codes: np.ndarray,
    pool: np.ndarray,
    num_clients: int,
    seed: int,
    client_test_fraction: float,
    min_client_examples: int,
    label_names: list[str],
) -> list[np.ndarray]:
    """Partition the pool rows among the clients with an flwr-datasets partitioner; return pool rows."""
    n = len(pool)
    needed = 1  # smallest client size whose local train split reaches min_client_examples
    while needed - _client_test_size(needed, client_test_fraction) < min_client_examples:
        needed += 1
    if n < num_clients * needed:
        raise DataError(
            f"{n} examples (after holding out the global test set) are too few for {num_clients} clients "
            f"with at least {min_client_examples} training examples each ({needed} examples per client "
            f"before the local test split). Use fewer clients, more data (max_examples_per_label) or "
            "a smaller global/client test fraction."
        )
    table = pa.table({"label": pa.array(codes[pool], type=pa.int64()), _ROW: pa.array(pool, type=pa.int64())})
    partitioner: _FlwrPartitioner
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        describe = f"iid partition of {n} examples into {num_clients} clients"
        hint = "Use fewer clients."
    elif kind == "dirichlet":
        assert isinstance(arg, float)
        min_size = max(min(10, n // (2 * num_clients)), needed)
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=arg,
            min_partition_size=min_size,
            seed=seed,
        )
        describe = (
            f"Dirichlet partition (alpha={arg:g}) of {n} examples into {num_clients} clients with at least "
            f"{min_size} examples each"
        )
        hint = "Use a larger alpha, fewer clients or more data per label."
    elif kind == "pathological":
        assert isinstance(arg, int)
        if arg > len(label_names):
            raise DataError(
                f"Partition 'pathological:{arg}' gives every client {arg} labels, but the data has only "
                f"{len(label_names)}. Use pathological:k with k <= {len(label_names)}."
            )
        # "first-deterministic" gives client i label i mod L first, so with num_clients >= L every label is
        # used; the default "random" assignment can leave labels (and their examples) unused.
        partitioner = PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_classes_per_partition=arg,
            class_assignment_mode="first-deterministic",
            seed=seed,
        )
        describe = f"pathological partition ({arg} labels per client) into {num_clients} clients"
        hint = "Use fewer clients, a larger k or more data per label."
    else:  # pragma: no cover - parse_partition only returns the kinds handled here
        raise DataError(f"Unsupported partition kind {kind!r}.")
    return _run_partitioner(partitioner, table, describe, hint)


def _natural_partition(natural_ids: pa.Array, pool: np.ndarray, num_clients: int, column: str) -> list[np.ndarray]:
    """One client per distinct value of ``natural_ids`` (sorted); return each client's pool rows."""
    all_ids = sorted(pc.unique(natural_ids).to_pylist())
    if len(all_ids) != num_clients:
        shown = ", ".join(map(repr, all_ids[:10])) + (", ..." if len(all_ids) > 10 else "")
        raise DataError(
            f"Partition 'natural:{column}' makes one client per distinct value of {column!r}: the data has "
            f"{len(all_ids)} ({shown}), but num_clients={num_clients}. Set num_clients={len(all_ids)}."
        )
    client_of = {value: i for i, value in enumerate(all_ids)}
    table = pa.table({"natural_id": natural_ids.take(pa.array(pool)), _ROW: pa.array(pool, type=pa.int64())})
    partitioner = NaturalIdPartitioner(partition_by="natural_id")
    with _without_natural_id_progress_bar():
        parts = _run_partitioner(partitioner, table, f"natural partition by {column!r}", "")
    rows: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(num_clients)]
    for pid, part in enumerate(parts):
        rows[client_of[partitioner.partition_id_to_natural_id[pid]]] = part
    return rows


@contextlib.contextmanager
def _without_natural_id_progress_bar() -> Iterator[None]:
    """Silence the tqdm bar NaturalIdPartitioner prints while grouping rows (it cannot be configured)."""
    module = sys.modules.get(NaturalIdPartitioner.__module__)
    original = getattr(module, "tqdm", None)
    if module is None or original is None:
        yield
        return
    module.tqdm = lambda iterable, *args, **kwargs: iterable  # type: ignore[attr-defined]
    try:
        yield
    finally:
        module.tqdm = original  # type: ignore[attr-defined]


def _make_dataset(data: pa.Table, rows: np.ndarray, features: datasets.Features) -> datasets.Dataset:
    table = data.take(pa.array(rows, type=pa.int64())).cast(features.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


def _label_counts(dataset: datasets.Dataset, num_labels: int) -> np.ndarray:
    labels = dataset.with_format("arrow")["label"].to_numpy()
    return np.bincount(labels, minlength=num_labels)


def _warn_unused_labels(clients: list[ClientData], label_names: list[str], partition: str) -> None:
    totals = np.zeros(len(label_names), dtype=np.int64)
    for client in clients:
        totals += _label_counts(client.train, len(label_names))
    unused = [label_names[i] for i, count in enumerate(totals) if count == 0]
    if unused:
        warnings.warn(
            f"With partition {partition!r} and {len(clients)} clients, no client trains on label(s) "
            f"{', '.join(unused)} (they still occur in the global test set). Use more clients or a larger k.",
            stacklevel=3,
        )


def load_client_file(
    path: str,
    *,
    client_id: int,
    label_names: Sequence[str],
    text_column: str = "text",
    label_column: str = "label",
    client_test_fraction: float = 0.2,
    seed: int = 0,
    min_client_examples: int = 2,
    extra_columns: Mapping[str, str] | None = None,
) -> ClientData:
    """One client's own data from a local file (a node that holds its data itself, e.g. ``fedlora node --data``).

    The labels are encoded against ``label_names``, the run's label set (every client must encode them alike, and
    a node's file may hold only some of them); the rows are split into train and test like a partitioned client's
    (stratified, ``client_test_fraction``, seeded by ``seed`` and ``client_id``). ``extra_columns`` are carried
    along as in :func:`prepare_federated_data` (the causal-LM task's response column).

    Raises:
        DataError: the file cannot be read, lacks the columns, holds labels outside ``label_names`` (named), or
            leaves fewer than ``min_client_examples`` training examples.
    """
    check_columns(text_column, label_column)
    dataset = load_table(path, text_column=text_column, label_column=label_column)
    extra = _extra_columns(dataset, extra_columns, path)
    wanted = [text_column, label_column, *(c for c in extra.values() if c not in (text_column, label_column))]
    table = dataset.select_columns(list(dict.fromkeys(wanted))).with_format("arrow")[:]
    table = _drop_unusable_rows(table, text_column, label_column, path)
    for name, column in extra.items():
        table = _drop_blank_rows(table, column, name, path)
    column = table.column(label_column)
    if not pa.types.is_string(column.type):
        column = pc.cast(column, pa.string())
    values = [str(v) for v in column.to_pylist()]
    index = {str(name): i for i, name in enumerate(label_names)}
    unknown = sorted({v for v in values if v not in index})
    if unknown:
        raise DataError(
            f"{path!r} holds label(s) {', '.join(map(repr, unknown[:10]))} that are not among the run's "
            f"{len(index)} labels ({', '.join(map(repr, list(index)[:20]))}); give only these labels, or a run "
            "whose labels option lists them"
        )
    codes = np.array([index[v] for v in values], dtype=np.int64)
    data = pa.table(
        {
            "text": table.column(text_column),
            "label": pa.array(codes, type=pa.int64()),
            **{name: table.column(column) for name, column in extra.items()},
        }
    )
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(index)),
            **{name: datasets.Value("string") for name in extra},
        }
    )
    rng = np.random.default_rng([seed, _STREAM_CLIENT, client_id])
    rows = np.arange(len(codes))
    train_rows, test_rows = _stratified_split(rows, codes, _client_test_size(len(rows), client_test_fraction), rng)
    if len(train_rows) < min_client_examples:
        raise DataError(
            f"{path!r} leaves {len(train_rows)} training examples after its local test split (fraction "
            f"{client_test_fraction}), fewer than {min_client_examples}"
        )
    return ClientData(
        client_id=client_id,
        train=_make_dataset(data, train_rows, features),
        test=_make_dataset(data, test_rows, features),
    )
