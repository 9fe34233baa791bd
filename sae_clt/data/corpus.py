"""Text corpora for language-model subjects, and their cutting into token windows.

``stdlib_docstrings`` needs nothing but Python: the docstrings of every module, class and
function in this interpreter's standard library, and its long prose string literals (pydoc's
help topics), read with ``ast`` (no module is imported, so
nothing runs) in sorted file order. The same Python version gives the same corpus; its hash goes
into the store's manifest.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from pathlib import Path

from ..errors import DataError

SKIP_PARTS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "__pycache__", "turtledemo"}


def stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(doc)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) >= 400:
                docs.append(node.value.strip())  # long prose literals, e.g. pydoc's help topics
    return list(dict.fromkeys(docs))  # first occurrence of each, order kept


def read_documents(corpus: str, root: Path, jsonl_field: str = "text") -> list[str]:
    """Documents of a corpus: the built-in one, or .txt / .jsonl files (a file or a folder)."""
    if corpus == "stdlib_docstrings":
        return stdlib_docstrings()
    path = Path(corpus) if Path(corpus).is_absolute() else root / corpus
    if not path.exists():
        raise DataError(f"text corpus {corpus!r}: {path} does not exist (expected 'stdlib_docstrings', a .txt/.jsonl file or a folder)")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    docs: list[str] = []
    for file in files:
        if file.suffix == ".jsonl":
            for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    docs.append(str(record[jsonl_field]))
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{file}:{n}: expected a JSON object with a {jsonl_field!r} field") from None
        else:
            docs.append(file.read_text(encoding="utf-8"))
    if not docs:
        raise DataError(f"text corpus {path}: no .txt or .jsonl documents found")
    return docs


def corpus_hash(docs: list[str]) -> str:
    h = hashlib.sha256()
    for doc in docs:
        h.update(doc.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def token_stream(docs: list[str], tokenizer, max_tokens: int) -> tuple[list[int], list[int]]:
    """Tokens of the documents back to back (no special tokens) and the document of each,
    stopping once ``max_tokens`` are gathered."""
    tokens: list[int] = []
    doc_ids: list[int] = []
    for doc_id, doc in enumerate(docs):
        ids = tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"]
        tokens += ids
        doc_ids += [doc_id] * len(ids)
        if len(tokens) >= max_tokens:
            break
    return tokens[:max_tokens], doc_ids[:max_tokens]
