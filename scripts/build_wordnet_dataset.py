"""Build fedlora's default dataset (WordNet 3.0 supersense classification) from Debian's wordnet-base.

The script parses the four WordNet 3.0 database files ``data.noun``, ``data.verb``, ``data.adj`` and
``data.adv`` (``wndb(5WN)`` format) and writes one row per synset to a zstd-compressed Parquet file:

========== ===================================================================================
column     content
========== ===================================================================================
synset     ``<8-digit offset>-<ss_type>``, e.g. ``02084071-n`` (satellite adjectives end in ``-s``)
pos        ``noun``, ``verb``, ``adj`` (head and satellite adjectives) or ``adv``
label      the lexicographer file (supersense), e.g. ``noun.animal``
lemmas     the synset's words joined by ``", "`` (underscores -> spaces, ``(a)``/``(p)``/``(ip)`` removed)
text       the definition: the gloss before the first ``; "`` example quote
examples   the quoted usage examples joined by ``" | "`` (may be empty)
========== ===================================================================================

Usage::

    python scripts/build_wordnet_dataset.py [--wordnet-dir /usr/share/wordnet]
                                            [--out src/fedlora/data/wordnet_supersenses.parquet]

The input files come from the Debian/Ubuntu package ``wordnet-base`` (``apt-get install wordnet-base``).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "fedlora" / "data" / "wordnet_supersenses.parquet"

# lexnames(5WN): lexicographer file number -> lexicographer file name (the "supersense").
LEXNAMES: dict[int, str] = {
    0: "adj.all",
    1: "adj.pert",
    2: "adv.all",
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
    29: "verb.body",
    30: "verb.change",
    31: "verb.cognition",
    32: "verb.communication",
    33: "verb.competition",
    34: "verb.consumption",
    35: "verb.contact",
    36: "verb.creation",
    37: "verb.emotion",
    38: "verb.motion",
    39: "verb.perception",
    40: "verb.possession",
    41: "verb.social",
    42: "verb.stative",
    43: "verb.weather",
    44: "adj.ppl",
}

DATA_FILES: tuple[str, ...] = ("data.noun", "data.verb", "data.adj", "data.adv")
POS_NAMES: dict[str, str] = {"n": "noun", "v": "verb", "a": "adj", "s": "adj", "r": "adv"}

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
_EXAMPLE_SPLIT = re.compile(r'(?<=")\s*[;,]\s*(?=")|(?<=")\s*;\s*|;\s*(?=")')
_ATTRIBUTION = re.compile(r'"\s*-\s*')


class WordNetFormatError(ValueError):
    """A line of a WordNet data file does not follow the wndb(5WN) format."""


@dataclass(frozen=True)
class Synset:
    """One parsed synset line."""

    synset: str
    pos: str
    label: str
    lemmas: str
    text: str
    examples: str


def split_gloss(gloss: str) -> tuple[str, list[str]]:
    """Split a WordNet gloss into its definition and its quoted usage examples.

    The definition is the text before the first ``; "``; the examples are the ``;``-separated quoted
    strings after it (surrounding quotes removed, ``quote"- Author`` attributions kept as
    ``quote - Author``).  A gloss without ``; "`` is all definition.
    """
    gloss = gloss.strip()
    cut = gloss.find('; "')
    if cut < 0:
        return gloss.rstrip("; ").strip(), []
    definition = gloss[:cut].rstrip("; ").strip()
    examples: list[str] = []
    for piece in _EXAMPLE_SPLIT.split(gloss[cut + 1 :]):
        piece = piece.strip().rstrip(";").strip()
        if piece.startswith('"'):
            piece = piece[1:]
        if piece.endswith('"'):
            piece = piece[:-1]
        if piece.count('"') % 2:  # a quotation followed by its source: ...end of quote"- Author
            piece = _ATTRIBUTION.sub(" - ", piece)
        piece = piece.strip()
        if piece:
            examples.append(piece)
    return definition, examples


def clean_word(word: str) -> str:
    """Turn a WordNet lemma as stored in a data file into display form."""
    return _ADJ_MARKER.sub("", word).replace("_", " ")


def parse_line(line: str) -> Synset:
    """Parse one synset line of a ``data.*`` file (wndb(5WN) format)."""
    head, sep, gloss = line.partition("| ")
    if not sep:
        raise WordNetFormatError("no '| gloss' separator")
    tokens = head.split()
    try:
        offset, lex_filenum, ss_type = tokens[0], int(tokens[1]), tokens[2]
        w_cnt = int(tokens[3], 16)
        pos = 4
        words = [clean_word(tokens[pos + 2 * i]) for i in range(w_cnt)]
        pos += 2 * w_cnt
        p_cnt = int(tokens[pos])
        pos += 1 + 4 * p_cnt
        if ss_type == "v" and pos < len(tokens):
            f_cnt = int(tokens[pos])
            pos += 1 + 3 * f_cnt
    except (IndexError, ValueError) as exc:
        raise WordNetFormatError(f"cannot parse fields: {exc}") from exc
    if pos != len(tokens):
        raise WordNetFormatError(f"expected {pos} fields before the gloss, found {len(tokens)}")
    if len(offset) != 8 or not offset.isdigit():
        raise WordNetFormatError(f"bad synset_offset {offset!r}")
    if ss_type not in POS_NAMES:
        raise WordNetFormatError(f"bad ss_type {ss_type!r}")
    if lex_filenum not in LEXNAMES:
        raise WordNetFormatError(f"unknown lex_filenum {lex_filenum}")
    definition, examples = split_gloss(gloss)
    return Synset(
        synset=f"{offset}-{ss_type}",
        pos=POS_NAMES[ss_type],
        label=LEXNAMES[lex_filenum],
        lemmas=", ".join(words),
        text=definition,
        examples=" | ".join(examples),
    )


def iter_synsets(path: Path) -> Iterator[Synset]:
    """Yield the synsets of one ``data.*`` file, skipping its licence header."""
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            try:
                yield parse_line(line.rstrip("\n"))
            except WordNetFormatError as exc:
                raise WordNetFormatError(f"{path}:{lineno}: {exc}") from exc


def build_table(wordnet_dir: Path) -> pa.Table:
    """Parse all four data files of ``wordnet_dir`` into a sorted Arrow table."""
    missing = [name for name in DATA_FILES if not (wordnet_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"WordNet data file(s) {', '.join(missing)} not found in {wordnet_dir}. "
            "Install them with `apt-get install wordnet-base` (Debian/Ubuntu) or pass "
            "--wordnet-dir pointing at a WordNet 3.0 'dict' directory."
        )
    rows = [synset for name in DATA_FILES for synset in iter_synsets(wordnet_dir / name)]
    rows.sort(key=lambda s: (s.pos, s.synset))
    columns = ("synset", "pos", "label", "lemmas", "text", "examples")
    return pa.table({col: pa.array([getattr(s, col) for s in rows], type=pa.string()) for col in columns})


def write_parquet(table: pa.Table, out: Path) -> None:
    """Write ``table`` as zstd-compressed Parquet (dictionary-encoding the low-cardinality columns)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        out,
        compression="zstd",
        compression_level=19,
        use_dictionary=["pos", "label"],
        row_group_size=1 << 20,
    )


def print_summary(table: pa.Table) -> None:
    """Print row counts per part of speech and per label."""
    pos_counts = collections.Counter(table.column("pos").to_pylist())
    label_counts = collections.Counter(table.column("label").to_pylist())
    print(f"total synsets: {table.num_rows}")
    print("rows per pos:")
    for pos, count in sorted(pos_counts.items()):
        print(f"  {pos:<5} {count:>7}")
    print("rows per label:")
    for label, count in sorted(label_counts.items()):
        print(f"  {label:<20} {count:>7}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wordnet-dir",
        type=Path,
        default=DEFAULT_WORDNET_DIR,
        help=f"directory with WordNet 3.0 data.{{noun,verb,adj,adv}} (default {DEFAULT_WORDNET_DIR})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output Parquet file (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        table = build_table(args.wordnet_dir)
    except (FileNotFoundError, WordNetFormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_parquet(table, args.out)
    print_summary(table)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
