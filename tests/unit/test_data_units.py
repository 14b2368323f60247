import numpy as np
import pytest

from aidc.data.clean import REASON, reason_counts, validate_features
from aidc.data.split import assign_splits
from aidc.data.transforms import standardize
from aidc.errors import AidcError, DataError, RequestError
import pickle


def test_split_is_deterministic_seeded_and_order_free():
    keys = np.arange(5000)
    a = assign_splits(keys, 0.8, 0.1, seed=0)
    b = assign_splits(keys[::-1], 0.8, 0.1, seed=0)[::-1]
    c = assign_splits(keys, 0.8, 0.1, seed=1)
    assert (a == b).all()
    assert (a != c).any()
    fractions = {s: (a == s).mean() for s in ("train", "val", "test")}
    assert abs(fractions["train"] - 0.8) < 0.03 and abs(fractions["val"] - 0.1) < 0.02


def test_validation_keeps_every_row_with_a_reason():
    batch = {
        "image": np.array([[[0, 1], [2, 3]], [[0, np.nan], [1, 1]], [[0, 99], [1, 1]], [[1, 1], [1, 1]]], dtype=float),
        "label": np.array([1, 2, 3, 12]),
    }
    out = validate_features(batch, "image", 0, 16, num_classes=10)
    assert list(out[REASON]) == ["", "image has NaN or infinite values", "image value outside 0..16",
                                 "label outside 0..9"]
    assert reason_counts(out[REASON]) == {"image has NaN or infinite values": 1, "image value outside 0..16": 1,
                                          "label outside 0..9": 1}


def test_standardize_uses_fitted_state():
    x = standardize(np.array([[2.0, 4.0]]), {"mean": 3.0, "std": 2.0})
    assert x.dtype == np.float32 and x.tolist() == [[-0.5, 0.5]]


@pytest.mark.parametrize("exc", [AidcError("boom"), DataError("bad file"), RequestError("bad", 413, "instances")])
def test_errors_survive_pickling_across_processes(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc)
    if isinstance(exc, RequestError):
        assert (back.status, back.field) == (413, "instances")
