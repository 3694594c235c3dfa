"""Loading classification tables for fedlora: the shipped WordNet dataset, local files, or the HF hub.

:func:`load_table` is the single entry point.  ``source`` is one of

* ``"default"`` -- the WordNet 3.0 supersense table shipped with the package (see ``README.md`` here);
* ``"wordnet-definitions"`` -- prompt/response pairs made from it (:mod:`fedlora.data.definitions`);
* a local file ending in ``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.ndjson`` or ``.parquet``, optionally
  compressed (``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.lz4`` -- not for Parquet, which compresses internally);
* anything else is treated as a Hugging Face hub dataset id (or a local dataset directory) and handed to
  :func:`datasets.load_dataset`.

Every problem a user can cause (missing file, unsupported format, missing column, unreadable data) raises
:class:`DataError`, whose message says what is wrong and how to fix it.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import importlib.resources
import importlib.util
import json
import lzma
import pathlib
from collections.abc import Iterator
from typing import BinaryIO

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.table import InMemoryTable

__all__ = [
    "DEFAULT_DATASET",
    "DEFAULT_LABELS",
    "DEFINITIONS_DATASET",
    "DataError",
    "check_columns",
    "default_dataset_path",
    "load_table",
]

DEFAULT_DATASET = "default"
"""``source`` value selecting the shipped WordNet supersense table."""
DEFINITIONS_DATASET = "wordnet-definitions"
"""``source`` value selecting "Define the word X." → gloss pairs made from it (:mod:`fedlora.data.definitions`)."""

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
    check_columns(text_column, label_column)
    source = source.strip()
    if source == DEFAULT_DATASET:
        dataset = _dataset_from_arrow(_read_default_table(str(default_dataset_path())))
        where = "the default WordNet dataset"
    elif source == DEFINITIONS_DATASET:
        from fedlora.data.definitions import definitions_dataset

        dataset = definitions_dataset()
        where = "the WordNet definitions dataset"
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
            _check_utf8(dataset, [c for c in (text_column, label_column) if c in dataset.column_names], path, fmt)
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


def check_columns(text_column: str, label_column: str) -> None:
    """Reject column choices that cannot be right whatever the data: empty names, or one column for both roles.

    Raises:
        DataError: a column name is not a non-empty string, or ``text_column == label_column``.
    """
    for role, column in (("text_column", text_column), ("label_column", label_column)):
        if not isinstance(column, str) or not column.strip():
            raise DataError(f"{role} must be the non-empty name of a column, got {column!r}.")
    if text_column == label_column:
        raise DataError(
            f"Column {text_column!r} is given as both the text column and the label column; a classifier "
            "cannot predict its own input. Name the column of labels with label_column= (--label-column) "
            "and the column of texts with text_column= (--text-column)."
        )


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
    """Read a local file with ``datasets``' packaged builders (compression is detected from the extension).

    An empty file, a file with a header but no rows, a malformed JSON line (reported with its 1-based line
    number) and any other unreadable content raise :class:`DataError` naming the file.
    """
    where = f"{fmt} file {str(path)!r}"
    if path.stat().st_size == 0:
        raise DataError(f"The {where} is empty (0 bytes): it has no rows. Check that it was written completely.")
    builder = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}[fmt]
    options = {"delimiter": "\t"} if fmt == "tsv" else {}
    try:
        dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as exc:  # datasets raises many types (DatasetGenerationError, ArrowInvalid, ...)
        raise _explain_read_failure(path, fmt, exc) from exc
    if dataset.num_rows == 0:
        raise DataError(f"The {where} has no rows (columns: {', '.join(map(repr, dataset.column_names)) or 'none'}).")
    return dataset


def _explain_read_failure(path: pathlib.Path, fmt: str, exc: Exception) -> DataError:
    """The clearest :class:`DataError` for a local file that ``datasets`` could not read."""
    where = f"{fmt} file {str(path)!r}"
    try:
        if fmt in ("json", "jsonl"):
            problem = _json_problem(path, whole_document=fmt == "json")
            if problem is not None:
                return DataError(f"Cannot read the {where}: {problem}.")
        elif fmt in ("csv", "tsv"):
            if "UnicodeDecodeError" in _root_cause(exc) and (line := _first_non_utf8_line(path)) is not None:
                return DataError(
                    f"The {where} is not UTF-8 text: line {line} holds invalid bytes. Save the file as UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`)."
                )
            lines = _first_lines(path, 2)
            if lines is not None and not lines:
                return DataError(f"The {where} has no rows: it contains only blank lines.")
            if lines is not None and len(lines) == 1:
                return DataError(
                    f"The {where} has no rows: it holds only the header line {_excerpt(lines[0])}. "
                    "Add data rows below it."
                )
        elif fmt == "parquet":
            rows = pq.read_metadata(path).num_rows
            if rows == 0:
                return DataError(f"The {where} has no rows.")
    except (OSError, EOFError, ValueError, pa.ArrowException):
        pass  # the file cannot even be opened this way: report what datasets said
    cause = _root_cause(exc)
    for suffix, module, package in ((".zst", "zstandard", "zstandard"), (".lz4", "lz4.frame", "lz4")):
        if path.name.lower().endswith(suffix) and importlib.util.find_spec(module.split(".")[0]) is None:
            return DataError(
                f"Cannot read the {where}: {suffix} files need the Python package {package!r}, which is not "
                f"installed. Install it (pip install {package}) or decompress the file first."
            )
    if "corresponds to no data" in cause:  # datasets' wording for a table without rows
        return DataError(f"The {where} has no rows.")
    return DataError(f"Could not read {where}: {cause}")


def _check_utf8(dataset: datasets.Dataset, columns: list[str], path: pathlib.Path, fmt: str) -> None:
    """Raise :class:`DataError` naming the first bad line if a string column holds bytes that are not UTF-8
    (pyarrow's JSON reader accepts them, and they would fail later when the texts are read)."""
    for name in columns:
        column = dataset.data.column(name)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            line = _first_non_utf8_line(path)
            at = f"line {line}" if line is not None else "somewhere"
            raise DataError(
                f"The {fmt} file {str(path)!r} is not UTF-8 text: column {name!r} holds invalid bytes ({at}). "
                "Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
            ) from None


def _first_non_utf8_line(path: pathlib.Path) -> int | None:
    """1-based number of the first line of the (decompressed) file that is not UTF-8, if one is found."""
    lines = _numbered_lines(path)
    if lines is None:
        return None
    try:
        for _ in lines:
            pass
    except _BadLine as bad:
        return bad.number
    return None


def _root_cause(exc: BaseException) -> str:
    """``Type: message`` of the innermost informative exception of a chain (datasets wraps the real error)."""
    chain = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain and len(chain) < 10:
        chain.append(nxt)
    generic = ("An error occurred while generating the dataset",)
    best = next((e for e in chain if str(e).strip() and not str(e).startswith(generic)), chain[0])
    text = str(best).strip() or "(no message)"
    return f"{type(best).__name__}: {text}"


def _open_binary(path: pathlib.Path) -> BinaryIO | None:
    """Open a (possibly compressed) local file for reading its decompressed bytes; ``None`` if its compression
    needs a module that is not installed."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    try:
        if name.endswith(".zst"):
            import zstandard

            return zstandard.open(path, "rb")
        if name.endswith(".lz4"):
            import lz4.frame

            return lz4.frame.open(path, "rb")
    except ImportError:
        return None
    return path.open("rb")


def _numbered_lines(path: pathlib.Path) -> Iterator[tuple[int, str]] | None:
    """``(1-based line number, line)`` of the decompressed UTF-8 file, or ``None`` if it cannot be decompressed
    here. A line that is not UTF-8 raises :class:`_BadLine` when reached."""
    handle = _open_binary(path)
    if handle is None:
        return None

    def lines() -> Iterator[tuple[int, str]]:
        with handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    reason = f"it is not valid UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
                    raise _BadLine(number, reason) from None
                yield number, line

    return lines()


class _BadLine(Exception):
    def __init__(self, number: int, reason: str) -> None:
        super().__init__(number, reason)
        self.number, self.reason = number, reason


def _first_lines(path: pathlib.Path, n: int) -> list[str] | None:
    """The first ``n`` non-blank lines of a (possibly compressed) text file; ``None`` if it cannot be read."""
    lines = _numbered_lines(path)
    if lines is None:
        return None
    found: list[str] = []
    try:
        for _, line in lines:
            if line.strip():
                found.append(line.rstrip("\r\n"))
                if len(found) == n:
                    break
    except _BadLine:
        return None
    return found


def _excerpt(text: str, width: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "...")


def _json_kind(value: object) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")


def _json_problem(path: pathlib.Path, *, whole_document: bool) -> str | None:
    """Describe the first problem of a JSON-lines file (or, if ``whole_document``, of a ``.json`` file holding
    either JSON lines or one array of row objects).

    Returns e.g. ``"line 7: Expecting ',' delimiter (column 12): '{...'"`` or ``"it has no rows"``; ``None`` when
    no problem is found or the file's compression cannot be read here.
    """
    lines = _numbered_lines(path)
    if lines is None:
        return None
    rows = fields = 0
    try:
        for number, line in lines:
            if not line.strip():
                continue
            if whole_document and rows == 0 and line.lstrip().startswith("["):
                return _json_array_problem(line + "".join(rest for _, rest in lines), first_line=number)
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                return f"line {number}: {exc.msg} (column {exc.colno}): {_excerpt(line)}"
            if not isinstance(value, dict):
                return (
                    f"line {number} is {_json_kind(value)}, not an object with one field per column: {_excerpt(line)}"
                )
            rows += 1
            fields += len(value)
    except _BadLine as bad:
        return f"line {bad.number}: {bad.reason}"
    if rows == 0:
        return "it has no rows (it holds only blank lines)"
    if fields == 0:
        return "it has no fields (every line is {})"
    return None


def _json_array_problem(text: str, *, first_line: int) -> str | None:
    """Describe the problem of a JSON document (starting at line ``first_line``) meant to be an array of rows."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        lines = text.split("\n")
        bad_line = lines[exc.lineno - 1] if exc.lineno <= len(lines) else ""
        return f"line {first_line + exc.lineno - 1}: {exc.msg} (column {exc.colno}): {_excerpt(bad_line)}"
    if not document:
        return "it has no rows (it holds an empty array)"
    for index, row in enumerate(document):
        if not isinstance(row, dict):
            return f"row {index + 1} of its array is {_json_kind(row)}, not an object with one field per column"
    return None


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
