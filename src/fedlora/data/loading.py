"""Loading classification tables for fedlora: the shipped WordNet dataset, local files, or the HF hub.

:func:`load_table` is the single entry point.  ``source`` is one of

* ``"default"`` -- the WordNet 3.0 supersense table shipped with the package (see ``README.md`` here);
* a local file ending in ``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.ndjson`` or ``.parquet``, optionally
  compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4`` -- not for Parquet, which compresses internally);
* anything else is treated as a Hugging Face hub dataset id (or a local dataset directory) and handed to
  :func:`datasets.load_dataset`.

Every problem a user can cause (missing file, unsupported format, missing column, unreadable data) raises
:class:`DataError`, whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import functools
import importlib.resources
import pathlib

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_LABELS",
    "DataError",
    "default_dataset_path",
    "load_table",
]

DEFAULT_DATASET = "default"
"""``source`` value selecting the shipped WordNet supersense table."""

DEFAULT_LABELS: tuple[str, ...] = (
    "noun.animal",
    "noun.artifact",
    "noun.body",
    "noun.food",
    "noun.location",
    "noun.person",
    "noun.plant",
    "noun.time",
)
"""The eight noun supersenses of fedlora's default classification task."""

_DEFAULT_FILE = "wordnet_supersenses.parquet"
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
# Extensions of files we cannot read: such a source is a (wrong) local path, never a hub dataset id.
_OTHER_FILE_EXTENSIONS = (
    ".txt",
    ".xls",
    ".xlsx",
    ".arrow",
    ".feather",
    ".pkl",
    ".pickle",
    ".zip",
    ".tar",
    ".npy",
    ".npz",
    ".h5",
    ".hdf5",
) + _COMPRESSIONS


class DataError(ValueError):
    """A user-facing data problem; the message names the problem and how to fix it."""


def default_dataset_path() -> pathlib.Path:
    """Return the path of the shipped WordNet supersense Parquet file."""
    path = pathlib.Path(str(importlib.resources.files("fedlora.data").joinpath(_DEFAULT_FILE)))
    if not path.is_file():
        raise DataError(
            f"The default dataset {path} is missing from the fedlora installation. Reinstall fedlora, "
            "or rebuild it with `python scripts/build_wordnet_dataset.py` (needs "
            "`apt-get install wordnet-base`)."
        )
    return path


def load_table(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
) -> datasets.Dataset:
    """Load a classification table as a :class:`datasets.Dataset`.

    Args:
        source: ``"default"``, a local ``.csv``/``.tsv``/``.json``/``.jsonl``/``.parquet`` file (optionally
            ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), or a Hugging Face hub dataset id.
        split: split to load from a hub dataset (ignored for local files and the default dataset).
        config_name: configuration (subset) name of a hub dataset.
        text_column: column holding the input text; must exist.
        label_column: column holding the class label; must exist.

    Returns:
        The dataset with all its columns (at least ``text_column`` and ``label_column``).

    Raises:
        DataError: the file does not exist or cannot be read, the format is unsupported, the hub dataset
            cannot be loaded, or one of the two columns is missing.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"Dataset source must be a non-empty string, got {source!r}.")
    source = source.strip()
    if source == DEFAULT_DATASET:
        dataset = _dataset_from_arrow(_read_default_table(str(default_dataset_path())))
        where = "the default WordNet dataset"
    else:
        fmt = _local_format(source)
        path = pathlib.Path(source).expanduser()
        looks_local = source.startswith(_PATH_PREFIXES) or source.lower().endswith(_OTHER_FILE_EXTENSIONS)
        if fmt is not None or looks_local or path.is_file():
            if not path.exists():
                raise DataError(f"Local dataset file {source!r} does not exist (resolved to {path.resolve()}).")
            if not path.is_file():
                raise DataError(f"Local dataset path {source!r} is not a file.")
            if fmt is None:
                raise DataError(
                    f"Cannot tell the format of local file {source!r} from its name. Use one of the "
                    f"extensions {', '.join(sorted(_FORMATS))} (optionally followed by "
                    f"{', '.join(_COMPRESSIONS)})."
                )
            dataset = _read_local_dataset(path, fmt)
            where = f"file {source!r}"
        else:
            dataset = _load_hub_dataset(source, split=split, config_name=config_name)
            where = f"Hugging Face dataset {source!r} (split {split!r})"
    missing = [col for col in (text_column, label_column) if col not in dataset.column_names]
    if missing:
        kinds = {text_column: "text", label_column: "label"}
        what = ", ".join(f"{kinds[col]} column {col!r}" for col in missing)
        raise DataError(
            f"{where} has no {what}. Available columns: "
            f"{', '.join(map(repr, dataset.column_names)) or 'none'}. "
            "Choose the right ones with text_column=/label_column= (--text-column/--label-column)."
        )
    return dataset


@functools.lru_cache(maxsize=2)
def _read_default_table(path: str) -> pa.Table:
    """Read (once per process) the shipped Parquet file."""
    return pq.read_table(path)


def _dataset_from_arrow(table: pa.Table) -> datasets.Dataset:
    """Wrap an in-memory Arrow table as a Dataset without copying."""
    return datasets.Dataset(InMemoryTable(table))


def _local_format(source: str) -> str | None:
    """Return the format implied by a file name's extension, or ``None`` if it has no known one."""
    name = source.lower()
    for compression in _COMPRESSIONS:
        if name.endswith(compression):
            name = name[: -len(compression)]
            if name.endswith((".parquet", ".pq")):
                return None  # Parquet is compressed internally; a compressed Parquet file is not readable.
            break
    for extension, fmt in _FORMATS.items():
        if name.endswith(extension):
            return fmt
    return None


def _read_local_dataset(path: pathlib.Path, fmt: str) -> datasets.Dataset:
    """Read a local file with ``datasets``' packaged builders (compression is detected from the extension)."""
    builder = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}[fmt]
    options = {"delimiter": "\t"} if fmt == "tsv" else {}
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        raise DataError(f"Could not read {fmt} file {str(path)!r}: {exc}") from exc


def _load_hub_dataset(source: str, *, split: str, config_name: str | None) -> datasets.Dataset:
    """Load one split of a Hugging Face hub dataset (needs network unless it is cached)."""
    try:
        dataset = datasets.load_dataset(source, config_name, split=split)
    except Exception as exc:  # the hub raises many exception types; all mean "cannot load this source"
        raise DataError(
            f"Could not load Hugging Face dataset {source!r} (config {config_name!r}, split {split!r}): "
            f"{type(exc).__name__}: {exc}. If you meant a local file, give its path with one of the "
            f"extensions {', '.join(sorted(_FORMATS))}; use {DEFAULT_DATASET!r} for the shipped WordNet "
            "dataset."
        ) from exc
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(
            f"Hugging Face dataset {source!r} did not return a single split for split={split!r} "
            f"(got {type(dataset).__name__}); name one split, e.g. 'train'."
        )
    return dataset
