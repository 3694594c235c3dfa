"""The default instruction-tuning data of the causal-LM task: "Define the word X." → WordNet gloss.

Built from the shipped WordNet table (``wordnet_supersenses.parquet``, see ``README.md`` here): one example per
synset, the prompt made from its first lemma, the response its gloss (``text``), the label its supersense, so
clients can be split by supersense (``natural:label``, one client per supersense) or by a Dirichlet draw over
supersenses (``dirichlet:<alpha>``), exactly like the classification task's clients.

Columns: ``text`` (the prompt), ``response`` (the gloss), ``label`` (the supersense), ``lemma``, ``synset``.
"""

from __future__ import annotations

import functools

import datasets
import pyarrow as pa
import pyarrow.compute as pc

from fedlora.data.loading import DEFINITIONS_DATASET

__all__ = ["DEFINITIONS_DATASET", "DEFINITIONS_LABEL_CAP", "PROMPT_TEMPLATE", "definitions_dataset", "prompt_for"]
PROMPT_TEMPLATE = "Define the word {lemma}."
DEFINITIONS_LABEL_CAP = 16
"""Examples per supersense the default causal-LM run keeps (8 supersenses: 128 examples), so that it takes a few
minutes on two CPU cores; ``max_examples_per_label`` changes it."""


def prompt_for(lemma: str) -> str:
    return PROMPT_TEMPLATE.format(lemma=lemma)


@functools.lru_cache(maxsize=1)
def _definitions_table() -> pa.Table:
    from fedlora.data.loading import _read_default_table, default_dataset_path

    table = _read_default_table(str(default_dataset_path()))
    glosses = pc.utf8_trim_whitespace(table.column("text"))
    first = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(table.column("lemmas"), ", "), 0))
    usable = pc.and_(pc.greater(pc.utf8_length(glosses), 0), pc.greater(pc.utf8_length(first), 0))
    lemmas = pc.filter(first, usable)
    prompts = pa.array([prompt_for(lemma) for lemma in lemmas.to_pylist()], type=pa.string())
    return pa.table(
        {
            "text": prompts,
            "response": pc.filter(glosses, usable),
            "label": pc.cast(pc.filter(table.column("label"), usable), pa.string()),
            "lemma": lemmas,
            "synset": pc.filter(table.column("synset"), usable),
        }
    )


def definitions_dataset() -> datasets.Dataset:
    """Every WordNet synset as a (prompt, gloss) pair with its supersense (117,659 rows; read once per process)."""
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(_definitions_table()))
