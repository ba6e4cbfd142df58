"""The embedded corpus: English technical prose that ships with Python, so everything runs offline.

The docstrings (longer than 200 characters) of the standard library, read with `ast` so nothing is imported,
plus pydoc's topic texts (`pydoc_data.topics`): about 1.6 MB of PSF-licensed text. Its tokenizer is an
8192-token byte-level BPE trained on the train split at prepare time.
"""

import ast
import functools
import inspect
import os
import sysconfig
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "tkinter", "site-packages"})
MIN_DOCSTRING_CHARS = 200
VOCAB_SIZE = 8192
EOS_TOKEN = "<|endoftext|>"  # id 0: the trainer adds special tokens first
TOKENIZER_NAME = f"embedded byte-level BPE ({VOCAB_SIZE} tokens, trained on the train split)"

_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # everything that can contain a def or class


@functools.cache
def embedded_documents() -> tuple[str, ...]:
    """The corpus in its fixed order: stdlib docstrings (files sorted by path, source order within a file), then
    pydoc topics sorted by name. Exact duplicates are dropped (some modules copy a docstring from a sibling),
    so the interleaved validation split never repeats a training document."""
    from pydoc_data.topics import topics  # plain data, safe to import

    documents = [doc for path in _stdlib_files() for doc in _docstrings(path) if len(doc) > MIN_DOCSTRING_CHARS]
    documents += [topics[name] for name in sorted(topics)]
    return tuple(dict.fromkeys(documents))


def _stdlib_files() -> Iterator[Path]:
    for directory, subdirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        subdirs[:] = sorted(name for name in subdirs if name not in EXCLUDED_DIRS)  # prune and fix the walk order
        yield from (Path(directory, name) for name in sorted(files) if name.endswith(".py"))


def _docstrings(path: Path) -> list[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like in old modules
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # e.g. files for another Python version; bad encodings are SyntaxErrors
        return []
    return list(_definition_docstrings(tree))


def _definition_docstrings(node: ast.AST) -> Iterator[str]:
    # Only statements are visited: definitions never nest inside expressions, which are most of the tree.
    if isinstance(node, _DEFINITIONS) and (doc := ast.get_docstring(node, clean=False)):
        yield inspect.cleandoc(doc)
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _BLOCKS):
            yield from _definition_docstrings(child)


def train_embedded_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE with VOCAB_SIZE tokens and EOS_TOKEN as id 0; the same texts give the same tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # decode(encode(text)) == text
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any text is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
