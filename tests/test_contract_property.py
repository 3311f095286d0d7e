"""Property test of the input contract (hypothesis): random prompt arrays of random dtypes, shapes
and values through ``predict``, ``decode_batch`` and ``predict_torch``. The only exceptions are
``ValueError`` / ``TypeError`` with a message; every result has the documented shapes and holds
no NaN."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from samhq_fast import Predictor

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

PTH = Path(__file__).parent / "fixtures" / "shapes_model" / "sam_hq_shapes.pth"
H, W = 37, 61
M = 64
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DTYPES = [
    np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.uint64,
    np.bool_, np.complex64, np.dtype("U3"), np.dtype(object),
]  # fmt: skip
SPECIAL = [0.0, 1.0, -1.0, 0.5, 10.0, 255.0, np.nan, np.inf, -np.inf, 3e38, -1e39, 1e7, 65504.0]


@pytest.fixture(scope="module")
def pred() -> Predictor:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    p = Predictor(PTH, device="cpu", backend="reference")
    p.set_image(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    yield p
    torch.set_num_threads(n)


def _shape(last: int | None) -> st.SearchStrategy:
    """Shapes near the valid ones: a right last axis most of the time, 0-3 leading axes."""
    lead = st.lists(st.integers(0, 3), min_size=0, max_size=3).map(tuple)
    tail = st.just((last,)) if last else st.just(())
    odd = st.integers(0, 5).map(lambda n: (n,))
    return st.one_of(st.tuples(lead, tail).map(lambda t: t[0] + t[1]), lead, odd)


def _values(dtype: np.dtype) -> st.SearchStrategy:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return st.one_of(st.sampled_from(SPECIAL), st.floats(-300, 300)).map(
            lambda v: np.asarray(v).astype(dtype, casting="unsafe")
        )
    if dtype.kind in "iu":
        lo, hi = np.iinfo(dtype).min, np.iinfo(dtype).max
        return st.one_of(st.integers(max(lo, -2), min(hi, 2)), st.integers(lo, hi))
    if dtype.kind == "b":
        return st.booleans()
    if dtype.kind == "c":
        return st.complex_numbers(max_magnitude=100)
    if dtype.kind == "U":
        return st.sampled_from(["1", "ab", ""])
    return st.sampled_from([1, None, "x", 2.5])


@st.composite
def wild(draw, last: int | None, label: bool = False) -> np.ndarray:
    """Any dtype (complex, strings, objects included), shapes near the valid ones."""
    dtype = np.dtype(draw(st.sampled_from(DTYPES if not label else DTYPES + [np.int64] * 4)))
    shape = draw(_shape(last))
    if dtype.kind == "O":
        values = [draw(_values(dtype)) for _ in range(int(np.prod(shape)))]
        return np.array(values, object).reshape(shape)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return draw(hnp.arrays(dtype, shape, elements=_values(dtype), fill=st.nothing()))


@st.composite
def plausible(draw, last: int) -> np.ndarray:
    """Well-formed prompts (mostly in the image, sometimes far out or non-finite)."""
    lead = draw(st.sampled_from([(), (), (1,), (2,), (0,)]))
    n = draw(st.integers(1, 3)) if last == 2 else None
    shape = (*lead, n, 2) if last == 2 else (*lead, 4)
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int64, np.float16]))
    coord = st.one_of(st.floats(-5, 70), st.floats(-5, 70), st.sampled_from(SPECIAL))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = draw(hnp.arrays(np.float64, shape, elements=coord)).astype(dtype)
    if last == 4 and a.size and draw(st.integers(0, 4)):  # usually a well-ordered box
        b = a.reshape(-1, 2, 2)
        a = np.concatenate([b.min(axis=1), b.max(axis=1)], axis=-1).reshape(shape)
    return a


@st.composite
def arrays(draw, last: int | None, label: bool = False) -> np.ndarray | None:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return None
    if kind <= 2 and last:
        return draw(plausible(last))
    return draw(wild(last, label))


@st.composite
def prompts(draw) -> dict:
    pts = draw(arrays(2))
    lab = draw(arrays(None, label=True)) if draw(st.integers(0, 3)) == 0 else None
    if pts is not None and draw(st.integers(0, 2)):  # labels of the right shape, mostly valid
        lab = draw(
            hnp.arrays(np.int64, pts.shape[:-1], elements=st.sampled_from([1, 0, -1, 1, 0, 7]))
        )
    box = draw(arrays(4))
    mask = draw(arrays(None)) if draw(st.integers(0, 3)) == 0 else None
    if draw(st.integers(0, 3)) == 0:
        lead = draw(st.sampled_from([(), (0,), (1,), (2,)]))
        mask = draw(hnp.arrays(np.float32, (*lead, 1, M, M), elements=st.sampled_from(SPECIAL[:6])))
    return dict(point_coords=pts, point_labels=lab, box=box, mask_input=mask)


FLAGS = st.sampled_from([True, False] * 4 + [np.True_, np.False_, 0, "no", None])


def _check(call, check_result) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # boxes clipped to the image
        warnings.simplefilter("error", RuntimeWarning)  # no numpy overflow noise either
        try:
            out = call()
        except (ValueError, TypeError) as e:
            assert str(e), f"{type(e).__name__} without a message"
            event(f"refused: {type(e).__name__}")
            return
    event("decoded")
    check_result(out)


def _no_nan(masks, scores, low, c_dims: tuple[int, ...], h: int, w: int) -> None:
    masks, scores, low = (np.asarray(x) for x in (masks, scores, low))
    assert masks.shape[-2:] == (h, w) and low.shape[-2:] == (M, M)
    assert masks.shape[:-2] == scores.shape == low.shape[:-2]
    assert scores.shape[-1:] in ((1,), (3,)) and scores.ndim in c_dims
    for x in (masks, scores, low):
        assert not np.isnan(x).any(), "NaN in a result"


@given(p=prompts(), mm=FLAGS, hq=FLAGS)
@SETTINGS
def test_predict_property(pred, p, mm, hq):
    _check(
        lambda: pred.predict(**p, multimask_output=mm, hq_token_only=hq),
        lambda out: _no_nan(*out, (1, 2), H, W),
    )


ITEM = st.tuples(arrays(2), st.one_of(st.none(), st.none(), arrays(None, label=True)), arrays(4))


@given(items=st.lists(ITEM, min_size=2, max_size=2), mm=FLAGS)
@SETTINGS
def test_decode_batch_property(pred, items, mm):
    emb = pred.embedding
    two = type(emb)(
        emb.image_embeddings.expand(2, -1, -1, -1),
        emb.hq_features.expand(2, -1, -1, -1),
        emb.original_sizes * 2,
        emb.input_sizes * 2,
    )
    pts, labs, boxes = (list(x) for x in zip(*items, strict=True))

    def check(results) -> None:
        assert len(results) == 2
        for r in results:
            _no_nan(*r, (2,), H, W)

    _check(lambda: pred.decode_batch(two, pts, labs, boxes, multimask_output=mm), check)


TORCH_DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64,
    torch.bool, torch.complex64,
]  # fmt: skip


@st.composite
def tensors(draw, last: int | None, label: bool = False):
    a = draw(arrays(last, label))
    if a is None or a.dtype.kind in "OU" or (a.dtype == np.uint64):
        return a  # not representable as a tensor: passed as it is
    dt = draw(st.sampled_from(TORCH_DTYPES))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.from_numpy(np.ascontiguousarray(a)).to(dt)


@given(
    pts=tensors(2),
    lab=st.one_of(st.none(), st.none(), tensors(None, label=True)),
    box=tensors(4),
    mm=FLAGS,
    lg=FLAGS,
)
@SETTINGS
def test_predict_torch_property(pred, pts, lab, box, mm, lg):
    def check(out) -> None:
        assert all(isinstance(x, torch.Tensor) for x in out)
        _no_nan(*(x.numpy() for x in out), (2,), H, W)

    _check(lambda: pred.predict_torch(pts, lab, box, multimask_output=mm, return_logits=lg), check)
