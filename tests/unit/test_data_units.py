import gzip
import pickle
import struct

import numpy as np
import pytest

from aidc.data.catalog import CATALOG, fetch
from aidc.data.clean import mark_duplicates, reason_counts
from aidc.data.readers import check_tabular_header, read_delimited, read_idx, read_text
from aidc.data.split import assign_splits, predefined_splits, time_splits
from aidc.data.tokenizer import decode, encode, pack_blocks, pad_truncate, train_tokenizer
from aidc.data.transforms import apply_index_map, augment_images, fit_index_map, fit_scalar_standardizer, standardize
from aidc.errors import AidcError, DataError, RequestError
from aidc.tasks import get_task
from tests.conftest import SHARED_DATA


# -- splits -------------------------------------------------------------------------
def test_hash_split_is_deterministic_seeded_and_order_free():
    keys = np.arange(5000)
    a = assign_splits(keys, 0.8, 0.1, seed=0)
    assert (a == assign_splits(keys[::-1], 0.8, 0.1, seed=0)[::-1]).all()
    assert (a != assign_splits(keys, 0.8, 0.1, seed=1)).any()
    assert abs((a == "train").mean() - 0.8) < 0.03 and abs((a == "val").mean() - 0.1) < 0.02


def test_predefined_split_keeps_the_datasets_own_test_set():
    origin = np.array(["train"] * 900 + ["test"] * 100, dtype=object)
    s = predefined_splits(np.arange(1000), origin, 0.9, seed=0)
    assert (s[900:] == "test").all() and set(s[:900]) == {"train", "val"}


def test_time_split_puts_each_users_latest_ratings_last():
    user = np.repeat([1, 2, 3], [10, 10, 2])
    time = np.concatenate([np.arange(10)[::-1], np.arange(10), [5, 6]])
    s = time_splits(user, time, val=0.1, test=0.2)
    u1 = dict(zip(time[:10], s[:10]))
    assert [u1[t] for t in (9, 8)] == ["test", "test"] and u1[7] == "val" and u1[0] == "train"
    assert (s[20:] == "train").all()  # too few ratings: never only in val/test


# -- cleaning -----------------------------------------------------------------------
def test_duplicates_keep_the_first_row_and_name_it():
    reasons = np.array(["", "", "bad", "", ""], dtype=object)
    out = mark_duplicates(np.array(["a", "b", "a", "a", "b"], dtype=object), np.arange(5), reasons)
    assert list(out) == ["", "", "bad", "duplicate of row 0", "duplicate of row 1"]
    assert reason_counts(out) == {"bad": 1, "duplicate row": 2}


@pytest.mark.parametrize("task,table,meta,expected", [
    ("image_classification",
     {"image": np.array([[[0, 1]], [[np.nan, 1]], [[0, 99]], [[1, 1]]], dtype=float), "label": np.array([1, 2, 3, 12])},
     {"raw_range": [0, 16], "num_classes": 10},
     ["", "pixel is NaN or infinite", "pixel value outside 0..16", "label outside 0..9"]),
    ("text_classification", {"text": np.array(["hi", "  ", "yo"], dtype=object), "label": np.array([0, 1, -1])}, {},
     ["", "empty text", "unknown label"]),
    ("recommendation", {"user": np.array([1, 1, -1]), "item": np.array([1, 2, 3]), "rating": np.array([4.0, 9, 3])},
     {"rating_range": [0.5, 5.0]}, ["", "rating outside 0.5..5", "negative user or item id"]),
])
def test_task_validation_gives_every_rejected_row_a_reason(task, table, meta, expected):
    assert list(get_task(task).validate(table, None, meta)) == expected


# -- transforms ---------------------------------------------------------------------
def test_standardizers_and_index_maps():
    state = fit_scalar_standardizer(np.array([1.0, 3.0]))
    assert standardize(np.array([[2.0, 4.0]]), state).tolist() == [[0.0, 2.0]]
    cols = standardize(np.array([[1.0, 10.0]]), {"mean": [0.0, 10.0], "std": [2.0, 5.0]})
    assert cols.tolist() == [[0.5, 0.0]]
    m = fit_index_map([30, 10, 20, 10])
    assert m == [10, 20, 30]
    assert apply_index_map(np.array([20, 99, 10]), m).tolist() == [2, 0, 1]  # unseen -> 0
    assert apply_index_map(np.array(["b", "z"], dtype=object), fit_index_map(["a", "b"])).tolist() == [2, 0]


def test_augmentation_changes_train_images_but_keeps_shape():
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[:, :, 2:6, 3:5] = 1.0
    cfg = {"max_shift": 2, "max_rotate": 15.0, "flip": False}
    out = augment_images(x, cfg, np.random.default_rng(0))
    assert out.shape == x.shape and not np.allclose(out, x)
    same = augment_images(x, {"max_shift": 0, "max_rotate": 0.0, "flip": False}, np.random.default_rng(0))
    assert np.allclose(same, x, atol=1e-5)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_tokenizers_round_trip_and_pad(kind):
    texts = ["hello world", "spam spam eggs", "free entry to win"] * 20
    state = train_tokenizer(texts, kind, vocab_size=300, lowercase=True)
    assert decode(encode(["Hello world"], state)[0], state) == "hello world"
    ids = encode(["hello"], state)
    padded = pad_truncate(ids + [list(range(3, 100))], 8, state["pad_id"])
    assert padded.shape == (2, 8) and padded[0, -1] == state["pad_id"]


def test_lm_packing_makes_shifted_blocks_of_every_token():
    blocks = pack_blocks([[5, 6, 7], [8, 9]], block_size=3, eos_id=2)
    assert blocks.tolist() == [[5, 6, 7, 2], [2, 8, 9, 2]]


# -- readers and malformed input ----------------------------------------------------
def _idx(path, magic=0x00000803, dims=(2, 2, 2), data=None, gz=True):
    raw = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)
    raw += data if data is not None else bytes(range(int(np.prod(dims))))
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_idx_reader(tmp_path):
    assert read_idx(_idx(tmp_path / "ok.gz")).shape == (2, 2, 2)
    with pytest.raises(DataError, match=r"bad.gz: wrong IDX magic 0x12345678 at byte 0"):
        read_idx(_idx(tmp_path / "bad.gz", magic=0x12345678))
    with pytest.raises(DataError, match=r"short.gz: IDX header says \(2, 2, 2\)"):
        read_idx(_idx(tmp_path / "short.gz", data=b"\x00" * 5))
    full = gzip.compress(struct.pack(">I", 0x803) + struct.pack(">3I", 10, 28, 28) + bytes(7840))
    (tmp_path / "trunc.gz").write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match=r"trunc.gz: truncated gzip: the compressed stream ends after \d+ bytes"):
        read_idx(tmp_path / "trunc.gz")
    (tmp_path / "empty.gz").write_bytes(b"")
    with pytest.raises(DataError, match="empty.gz: the file is empty"):
        read_idx(tmp_path / "empty.gz")


def test_csv_reader_names_file_line_and_columns(tmp_path):
    good = tmp_path / "r.csv"
    good.write_text("userId,movieId,rating,timestamp\n1,2,4.0,5\n")
    assert read_delimited(good, ["userId", "movieId", "rating", "timestamp"]).num_rows == 1
    quote = tmp_path / "quote.csv"
    quote.write_text('a,b\n1,2\n3,"unterminated\n4,5\n')
    with pytest.raises(DataError, match=r"quote.csv: line 3, column .b.: unterminated quote"):
        read_delimited(quote, ["a", "b"])
    extra = tmp_path / "extra.csv"
    extra.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"extra.csv: CSV parse error: Expected 2 columns, got 3: 3,4,5 \(line 3\)"):
        read_delimited(extra, ["a", "b"])
    cols = tmp_path / "cols.csv"
    cols.write_text("user,movie\n1,2\n")
    with pytest.raises(DataError, match=r"cols.csv: wrong column names in the header: missing \['userId'"):
        read_delimited(cols, ["userId", "movieId"])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="empty.csv: the file is empty"):
        read_delimited(tmp_path / "empty.csv", ["a"])


def test_text_reader_reports_bad_encoding_by_line(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(b"ok\nfine\n\xff\xfe bad\n")
    with pytest.raises(DataError, match=r"t.txt: line 3, byte 8: not valid utf-8"):
        read_text(p)


def test_tabular_header_check(tmp_path):
    (tmp_path / "d.csv").write_text("x,y\n1,0\n")
    check_tabular_header(str(tmp_path / "d.csv"), "csv", ["x", "y"])
    with pytest.raises(DataError, match=r"d.csv: missing column\(s\) \['z'\]; the file has \['x', 'y'\]"):
        check_tabular_header(str(tmp_path / "d.csv"), "csv", ["x", "z"])


# -- named datasets: mirror, checksums, terms ---------------------------------------
def test_fetch_from_mirror_verifies_checksums(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("AIDC_CACHE", str(tmp_path / "cache"))
    paths = fetch("tinyshakespeare", mirror=str(SHARED_DATA))
    assert paths["input.txt"].stat().st_size == 1115394
    assert "Terms of use" in caplog.text  # shown on first fetch
    caplog.clear()
    fetch("tinyshakespeare", mirror=str(SHARED_DATA))
    assert "Terms of use" not in caplog.text  # ...and only then

    bad = tmp_path / "mirror" / "tinyshakespeare"
    bad.mkdir(parents=True)
    (bad / "input.txt").write_text("not shakespeare")
    with pytest.raises(DataError, match="fails its sha256 check"):
        fetch("tinyshakespeare", mirror=str(tmp_path / "mirror"))
    with pytest.raises(DataError, match="must hold sms-spam-collection/SMSSpamCollection"):
        fetch("sms-spam", mirror=str(tmp_path / "mirror"))


def test_catalog_matches_the_shared_mirror():
    for entry in CATALOG.values():
        for f in entry.files:
            assert (SHARED_DATA / entry.dir / f.name).is_file()


@pytest.mark.parametrize("exc", [AidcError("boom"), DataError("bad file"), RequestError("bad", 413, "instances")])
def test_errors_survive_pickling_across_processes(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, RequestError):
        assert (back.status, back.field) == (413, "instances")
