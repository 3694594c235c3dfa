"""Data layer of fedlora: loading classification tables and partitioning them among federated clients.

The default dataset is WordNet 3.0's synsets labelled with their supersense (lexicographer file), shipped
as ``wordnet_supersenses.parquet`` next to this file (see ``README.md`` and ``WORDNET_LICENSE.txt``).
"""

from fedlora.data.loading import DEFAULT_DATASET, DEFAULT_LABELS, DataError, default_dataset_path, load_table
from fedlora.data.partition import (
    ClientData,
    FederatedData,
    label_histogram,
    load_client_file,
    parse_partition,
    prepare_federated_data,
)

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_LABELS",
    "ClientData",
    "DataError",
    "FederatedData",
    "default_dataset_path",
    "label_histogram",
    "load_client_file",
    "load_table",
    "parse_partition",
    "prepare_federated_data",
]
