"""Reading a text corpus as a stream of documents, and the embedded default corpus.

Sources: plain text files (``.txt``, ``.md``, ``.rst`` or any other name), JSON Lines files
(``.jsonl``, one object per line with a ``text`` field), either of them gzip-compressed (``.gz``),
and directories, searched recursively for files with those suffixes in sorted order.

Plain text is split into documents at blank lines (one or more lines holding only whitespace),
or with ``doc_sep="line"`` one document per line; each JSON line is one document.  A document
is cut at the first line end past :data:`MAX_DOC_CHARS` characters (a longer line is read in
pieces of that size), and a JSON record longer than that is cut the same way, so neither a file
without blank lines, nor one giant line, nor one giant record can blow up memory, and the
validation split stays fine-grained.  A JSON line longer than :data:`MAX_RECORD_CHARS` is refused.  Bytes that are not UTF-8 are
replaced with U+FFFD and counted.

The embedded default corpus is the English that ships with every CPython: the ``pydoc`` topic
texts (``pydoc_data.topics``) and the docstrings of the standard library's modules, classes
and functions (read with :mod:`ast`, nothing is imported).  It is extracted once into the cache
directory (an argument; the CLI's ``$LMLAB_CACHE``) as JSON Lines, so the quickstart needs no download.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import hashlib
import io
import json
import os
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.io import atomic_open, remove_stale_temps

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
MAX_DOC_CHARS = 1 << 16
# The longest JSON Lines record read (in characters); a longer line is refused with an error.
MAX_RECORD_CHARS = 1 << 26
DOC_SEPARATORS = ("blank", "line")
_READ_CHUNK = 1 << 20


@dataclass
class SourceStats:
    """What was read from one source file; filled in while its documents are streamed."""

    path: str
    bytes: int = 0
    sha256: str = ""
    documents: int = 0
    undecodable_bytes: int = 0
    _hash: hashlib._Hash = field(default_factory=hashlib.sha256, repr=False)

    def as_dict(self) -> dict:
        return {
            "path": self.path,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "documents": self.documents,
            "undecodable_bytes": self.undecodable_bytes,
        }


class _HashingReader(io.RawIOBase):
    """A raw reader that hashes and counts the bytes of the file as they are read."""

    def __init__(self, f, stats: SourceStats):
        self._f = f
        self._stats = stats

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self._stats._hash.update(memoryview(b)[:n])
            self._stats.bytes += n
        return n


class _CountingUTF8Decoder(codecs.IncrementalDecoder):
    """UTF-8, each undecodable byte sequence replaced by one U+FFFD and its bytes counted in ``stats``.

    What ``errors="replace"`` gives, with the count it cannot: the strict decoder names each bad
    sequence (``exc.start``, ``exc.end``), exactly as it would pass it to an error handler, so no
    handler has to be registered process-wide.  Bytes of a sequence cut by a chunk's end wait for
    the next chunk.
    """

    def __init__(self, stats: SourceStats):
        super().__init__("strict")
        self._stats = stats
        self._pending = b""

    def decode(self, data: bytes, final: bool = False) -> str:
        buf = memoryview(self._pending + bytes(data))
        out, pos = [], 0
        while True:
            try:
                text, used = codecs.utf_8_decode(buf[pos:], "strict", final)
            except UnicodeDecodeError as e:
                out.append(str(buf[pos : pos + e.start], "utf-8"))
                out.append("\ufffd")
                self._stats.undecodable_bytes += e.end - e.start
                pos += e.end
                continue
            out.append(text)
            pos += used
            break
        self._pending = bytes(buf[pos:])
        return "".join(out)

    def reset(self) -> None:
        self._pending = b""

    def getstate(self) -> tuple[bytes, int]:
        return self._pending, 0

    def setstate(self, state: tuple[bytes, int]) -> None:
        self._pending = state[0]


class _TextReader:
    """The text of a byte stream, read as ``io.TextIOWrapper(encoding="utf-8", newline=None)`` reads it
    (universal newlines), decoded by :class:`_CountingUTF8Decoder`; just ``readline`` and ``buffer``."""

    def __init__(self, buffer: io.BufferedIOBase, stats: SourceStats):
        self.buffer = buffer
        self._decoder = io.IncrementalNewlineDecoder(_CountingUTF8Decoder(stats), translate=True)
        self._text, self._pos, self._eof = "", 0, False

    def __enter__(self) -> _TextReader:
        return self

    def __exit__(self, *exc) -> None:
        self.buffer.close()

    def _fill(self) -> bool:
        """Decode the next chunk into the (consumed) text buffer; False at the end of the stream."""
        while not self._eof:
            data = self.buffer.read(_READ_CHUNK)
            self._eof = not data
            self._text, self._pos = self._decoder.decode(data, final=self._eof), 0
            if self._text:
                return True
        return False

    def readline(self, limit: int) -> str:
        """The next line (ending in ``\n``), or its next ``limit`` characters; "" at the end."""
        parts, need = [], limit
        while True:
            text, pos = self._text, self._pos
            end = min(len(text), pos + need)
            nl = text.find("\n", pos, end)
            if nl >= 0:
                parts.append(text[pos : nl + 1])
                self._pos = nl + 1
                break
            parts.append(text[pos:end])
            self._pos = end
            need -= end - pos
            if need == 0 or not self._fill():
                break
        return "".join(parts)


def _strip_gz(name: str) -> str:
    return name[:-3] if name.endswith(".gz") else name


def is_jsonl(path: Path) -> bool:
    return _strip_gz(path.name).endswith(JSONL_SUFFIXES)


def resolve_sources(paths: list[str | os.PathLike]) -> list[Path]:
    """Expand directories (recursively, sorted) and check that every path exists.

    Explicitly named files are taken whatever their suffix; inside directories only text and
    JSON Lines files (optionally ``.gz``) are taken.
    """
    out: list[Path] = []
    wanted = TEXT_SUFFIXES + JSONL_SUFFIXES
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise LmlabError(f"corpus path {raw} does not exist")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _strip_gz(f.name).endswith(wanted))
            if not found:
                raise LmlabError(
                    f"corpus directory {raw} holds no {', '.join(wanted)} files (or .gz of them)"
                )
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise LmlabError(f"corpus path {raw} is not a regular file or directory")
    return out


def _open_text(path: Path, stats: SourceStats) -> _TextReader:
    raw = open(path, "rb", buffering=0)  # noqa: SIM115 - owned by the returned reader
    hashed: io.BufferedIOBase = io.BufferedReader(_HashingReader(raw, stats), _READ_CHUNK)
    if path.name.endswith(".gz"):
        hashed = gzip.GzipFile(fileobj=hashed, mode="rb")
    return _TextReader(hashed, stats)


def _file_pieces(f: _TextReader) -> Iterator[str]:
    """The stream's lines, a line longer than :data:`MAX_DOC_CHARS` in pieces of that size."""
    return iter(lambda: f.readline(MAX_DOC_CHARS), "")


def _text_pieces(text: str) -> Iterator[str]:
    """The same pieces as :func:`_file_pieces` for text already in memory (no copy of it whole)."""
    pos, n = 0, len(text)
    while pos < n:
        nl = text.find("\n", pos, pos + MAX_DOC_CHARS)
        end = pos + MAX_DOC_CHARS if nl < 0 else nl + 1
        yield text[pos:end]
        pos = end


def _plain_documents(pieces: Iterator[str], doc_sep: str | None) -> Iterator[str]:
    """Documents from lines; ``doc_sep=None`` cuts only for length (a huge JSON record)."""
    lines: list[str] = []
    size = 0
    for piece in pieces:
        if doc_sep is not None and not piece.strip():
            end = True  # a blank line
        else:
            lines.append(piece)
            size += len(piece)
            at_line_end = piece.endswith("\n")
            end = (
                (doc_sep == "line" and at_line_end)
                or (size >= MAX_DOC_CHARS and at_line_end)
                or size >= 2 * MAX_DOC_CHARS  # one enormous line: cut it in pieces
            )
        if end and lines:
            doc = "".join(lines).strip()
            lines, size = [], 0
            if doc:
                yield doc
    if lines and (doc := "".join(lines).strip()):
        yield doc


def _jsonl_documents(f: _TextReader, path: Path) -> Iterator[str]:
    lineno = 0
    # A capped read: a file that is one endless line is refused, not read whole into memory.
    while line := f.readline(MAX_RECORD_CHARS + 1):
        lineno += 1
        if len(line) > MAX_RECORD_CHARS and not line.endswith("\n"):
            raise LmlabError(
                f"{path}:{lineno}: a JSON Lines record longer than {MAX_RECORD_CHARS:,} characters; "
                "split it into several records, or give the text as a plain text file"
            )
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmlabError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        line = ""
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise LmlabError(f'{path}:{lineno}: expected an object with a string "text" field')
        obj = None
        text = text.strip()
        if len(text) <= MAX_DOC_CHARS:
            if text:
                yield text
        else:
            # A huge record is cut into documents exactly as plain text without blank lines
            # would be, so its batches stay small (the tokenizer's memory grows with the
            # longest document).
            yield from _plain_documents(_text_pieces(text), None)


def iter_documents(path: Path, stats: SourceStats | None = None, doc_sep: str = "blank") -> Iterator[str]:
    """Stream the non-empty documents of one source file; fills ``stats`` as it goes."""
    if doc_sep not in DOC_SEPARATORS:
        raise LmlabError(f"unknown document separator {doc_sep!r}; choose one of {', '.join(DOC_SEPARATORS)}")
    stats = stats if stats is not None else SourceStats(str(path))
    try:
        with _open_text(path, stats) as f:
            docs = _jsonl_documents(f, path) if is_jsonl(path) else _plain_documents(_file_pieces(f), doc_sep)
            for doc in docs:
                stats.documents += 1
                yield doc
            # Drain whatever the decoder has not consumed so the hash covers the whole file.
            f.buffer.read()
    except (OSError, EOFError, zlib.error) as e:
        # gzip.BadGzipFile is an OSError; a damaged deflate stream is zlib.error, a truncated one EOFError.
        what = "a damaged or truncated gzip file" if path.name.endswith(".gz") else "unreadable"
        raise LmlabError(f"cannot read {path} ({what}): {e}") from None
    stats.sha256 = stats._hash.hexdigest()


# --- the embedded default corpus -------------------------------------------------------------


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """lmlab's cache directory: ``cache`` when given, else ``~/.cache/lmlab``.

    The command line passes ``$LMLAB_CACHE`` (else ``$XDG_CACHE_HOME/lmlab``) here
    (:func:`lmlab.cli.env_cache_dir`); library code reads no environment variable.
    """
    return Path(cache) if cache else Path.home() / ".cache" / "lmlab"


def _stdlib_docstrings() -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        parts = path.relative_to(stdlib).parts
        if parts[0] == "site-packages" or any(p in ("test", "tests", "idle_test") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a few stdlib files are deliberately invalid (e.g. lib2to3 test data)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                # One-liners ("Return x.") are too short to teach a model much.
                if doc and len(doc) >= 40:
                    yield doc


def default_corpus_path(cache: str | os.PathLike | None = None) -> Path:
    """The embedded default corpus as JSON Lines in :func:`cache_dir`, extracted on first use (seconds)."""
    v = sys.version_info
    path = cache_dir(cache) / f"default-corpus-py{v.major}.{v.minor}.{v.micro}.jsonl"
    remove_stale_temps(path.parent)  # what an extraction killed part-way left behind
    if path.is_file():
        return path
    import pydoc_data.topics

    with atomic_open(path, "w", encoding="utf-8") as f:
        for name in sorted(pydoc_data.topics.topics):
            f.write(json.dumps({"text": pydoc_data.topics.topics[name].strip()}) + "\n")
        for doc in _stdlib_docstrings():
            f.write(json.dumps({"text": doc}) + "\n")
    return path
