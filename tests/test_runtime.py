"""Prompt-count buckets, ``compile=True`` (kernels as custom ops) and ``warmup()``; CUDA graphs on
GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from samhq_fast.predictor import Predictor
from samhq_fast.runtime import (
    PROMPT_BUCKETS,
    DecoderRunner,
    StaticInputs,
    bucket_for,
    check_buckets,
    resolve_cuda_graphs,
)

from _device import TRITON_DEVICE
from _weights import build_official, perturb_, save_official_pth, small_config

CFG = small_config(128, hidden=64, depth=2, heads=2, window=3, global_idx=(1,))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("rt") / "m.pth"
    save_official_pth(perturb_(build_official(CFG), seed=2), path)
    return path


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (90, 120, 3), dtype=np.uint8)


def _points(p: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 90, (p, 1, 2)), np.ones((p, 1))


def test_buckets():
    assert [bucket_for(p, PROMPT_BUCKETS) for p in (1, 3, 4, 5, 33, 64)] == [1, 4, 4, 8, 64, 64]
    with pytest.raises(ValueError, match="largest bucket"):
        bucket_for(65, PROMPT_BUCKETS)
    for bad in ((), (4, 2), (0, 1), (1, 1)):
        with pytest.raises(ValueError, match="increasing positive"):
            check_buckets(bad)


@pytest.mark.parametrize("per_prompt_dense", [False, True])
@torch.no_grad()
def test_runner_pads_and_chunks_without_changing_outputs(ckpt, per_prompt_dense):
    pred = Predictor(ckpt, device="cpu", backend="torch")
    emb = pred.embed([_image(0), _image(1)])
    dec = pred.model.mask_decoder
    g = torch.Generator().manual_seed(0)
    P = 11
    sparse = torch.randn(2, P, 2, 256, generator=g)
    h = emb.image_embeddings.shape[-1]
    dense = torch.randn(*((2, P) if per_prompt_dense else (2,)), 256, h, h, generator=g)
    args = (emb.image_embeddings, pred._image_pe, sparse, dense, emb.hq_features)
    ref_masks, ref_iou = dec.predict_masks(*args)
    seen = []

    def spy(*a):
        seen.append(a[2].shape[1])
        return dec.predict_masks(*a)

    masks, iou = DecoderRunner(spy, buckets=(1, 4, 8))(*args)  # 11 -> 8 + 3 (padded to 4)
    assert seen == [8, 4]
    assert masks.shape == ref_masks.shape and iou.shape == ref_iou.shape
    torch.testing.assert_close(masks, ref_masks, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(iou, ref_iou, rtol=1e-4, atol=1e-5)


def test_cuda_graphs_need_cuda(ckpt):
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA model"):
        Predictor(ckpt, device="cpu", cuda_graphs=True)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_matches_eager_without_recompiling_per_prompt_count(ckpt, backend):
    """compile traces the Triton custom ops (fake implementations) and the bucketed decoder
    compiles a few graphs, not one per prompt count. ``aot_eager`` runs the same tracing as
    inductor without generating code, so the test stays fast on CPU."""
    if backend == "triton":
        pytest.importorskip("triton")
    torch._dynamo.reset()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    eager = Predictor(ckpt, device=device, backend=backend, cuda_graphs=False)
    comp = Predictor(ckpt, device=device, backend=backend, compile="aot_eager", cuda_graphs=False)
    assert comp.model.backend == backend and not comp.cuda_graphs
    img = _image()
    e_emb, c_emb = eager.embed(img), comp.embed(img)
    torch.testing.assert_close(c_emb.image_embeddings, e_emb.image_embeddings)
    torch.testing.assert_close(c_emb.hq_features, e_emb.hq_features)
    after_encoder = _unique_graphs()
    for p in (1, 3, 6, 13, 2, 5):
        pts, lab = _points(p, seed=p)
        m_e, s_e, l_e = eager.decode(e_emb, pts, lab, multimask_output=False)
        m_c, s_c, l_c = comp.decode(c_emb, pts, lab, multimask_output=False)
        assert m_c.shape == m_e.shape == (p, 1, 90, 120)
        np.testing.assert_allclose(l_c, l_e, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s_c, s_e, rtol=1e-4, atol=1e-5)
        assert (m_c != m_e).mean() < 1e-3
    decoder_graphs = _unique_graphs() - after_encoder
    print(f"[compile] {backend}: {decoder_graphs} decoder graphs for 6 prompt counts")
    assert 1 <= decoder_graphs <= 3  # static first shape, then one dynamic graph (+ margin)


def test_warmup_reports_its_cost(ckpt):
    pred = Predictor(ckpt, device="cpu", backend="torch", prompt_buckets=(1, 4))
    report = pred.warmup(batch_sizes=(1, 2), prompt_tokens=(2, 3))
    assert set(report) == {"encoder_s", "decoder_s", "total_s"}
    assert set(report["encoder_s"]) == {1, 2}
    assert set(report["decoder_s"]) == {"1x2", "1x3", "4x2", "4x3"}
    assert all(v > 0 for v in report["encoder_s"].values())
    assert report["total_s"] >= sum(report["decoder_s"].values())
    assert pred.warmup_report is report


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compile_and_graphs_match_eager(ckpt):
    """The done-when configuration: bf16, Triton, compile=True (inductor) with CUDA graphs."""
    eager = Predictor(ckpt, device="cuda", dtype="bf16", backend="triton", cuda_graphs=False)
    fast = Predictor(ckpt, device="cuda", dtype="bf16", backend="triton", compile=True)
    assert fast.cuda_graphs and fast.model.backend == "triton"
    report = fast.warmup(prompt_counts=(1, 4, 16))
    print(f"[warmup] {report}")
    assert len(fast._predict_masks.graphs) == 3
    img = _image()
    e_emb, f_emb = eager.embed(img), fast.embed(img)
    for p in (1, 3, 16, 70):
        pts, lab = _points(p, seed=p)
        _, s_e, l_e = eager.decode(e_emb, pts, lab, multimask_output=False)
        _, s_f, l_f = fast.decode(f_emb, pts, lab, multimask_output=False)
        scale = np.abs(l_e).max()
        assert np.abs(l_f - l_e).max() <= 0.05 * scale
        np.testing.assert_allclose(s_f, s_e, atol=0.02)
    # replaying a graph gives what eager gives on the same embedding
    _, s_g, l_g = fast.decode(f_emb, *_points(4, seed=9), multimask_output=False)
    _, s_x, l_x = eager.decode(f_emb, *_points(4, seed=9), multimask_output=False)
    assert np.abs(l_g - l_x).max() <= 0.02 * np.abs(l_x).max()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@torch.no_grad()
def test_gpu_graphs_by_default_bind_each_image_once(ckpt, backend):
    """A CUDA Predictor replays graphs without compile, for every backend; alternating images
    gives the eager answers, and the image inputs are copied once per image change."""
    graphs = Predictor(ckpt, device="cuda", dtype="bf16", backend=backend)
    eager = Predictor(ckpt, device="cuda", dtype="bf16", backend=backend, cuda_graphs=False)
    assert graphs.cuda_graphs and not eager.cuda_graphs
    embs = [graphs.embed(_image(i)) for i in range(2)]
    for step, i in enumerate([0, 0, 1, 0, 1, 1]):
        pts, lab = _points(3, seed=step)
        _, s_g, l_g = graphs.decode(embs[i], pts, lab, multimask_output=False)
        _, s_e, l_e = eager.decode(embs[i], pts, lab, multimask_output=False)
        assert np.abs(l_g - l_e).max() <= 0.02 * np.abs(l_e).max(), f"step {step}"
        np.testing.assert_allclose(s_g, s_e, atol=0.02)
    (statics,) = graphs._predict_masks.image_inputs.values()
    assert statics.copies == 4 + 2 * 3  # all 4 once, then emb + hq at each of 3 changes


# ----------------------------------------------------------- CUDA graph defaults and binding
def test_cuda_graphs_default_resolution():
    """None: on for a CUDA model (every backend), off elsewhere; explicit values are kept, True
    on CPU refused. (A CUDA model cannot be built here: the resolution is tested directly.)"""
    assert resolve_cuda_graphs(None, "cuda") is True
    assert resolve_cuda_graphs(None, torch.device("cuda", 1)) is True
    assert resolve_cuda_graphs(None, "cpu") is False
    assert resolve_cuda_graphs(None, "meta") is False
    assert resolve_cuda_graphs(False, "cuda") is False
    assert resolve_cuda_graphs(True, "cuda") is True
    with pytest.raises(ValueError, match="needs a CUDA model"):
        resolve_cuda_graphs(True, "cpu")
    with pytest.raises(TypeError, match="bool or None"):
        resolve_cuda_graphs(1, "cuda")


def test_predictor_cuda_graphs_default_on_cpu_is_off(ckpt):
    pred = Predictor(ckpt, device="cpu", backend="torch")
    assert pred.cuda_graphs is False and pred._predict_masks.buckets is None
    with pytest.raises(TypeError):
        Predictor(ckpt, device="cpu", cuda_graphs="yes")


def test_static_inputs_copy_only_a_new_source():
    a = torch.randn(2, 3, 4)
    b = torch.randn(2, 3, 4)
    st = StaticInputs([a])
    assert st.bind([a]) == 1 and torch.equal(st.tensors[0], a)
    assert st.bind([a]) == 0  # same tensor, unchanged
    assert st.bind([a[:]]) == 0  # a new view object of the same memory and layout
    assert st.bind([b]) == 1 and torch.equal(st.tensors[0], b)
    assert st.bind([a]) == 1 and torch.equal(st.tensors[0], a)  # alternating images
    a.mul_(2)  # written in place: the version counter moved
    assert st.bind([a]) == 1 and torch.equal(st.tensors[0], a)
    big = torch.randn(4, 3, 4)
    assert st.bind([big[:2]]) == 1 and st.bind([big[2:]]) == 1  # other offset, same base
    assert torch.equal(st.tensors[0], big[2:])
    e = torch.randn(1, 3, 1).expand(2, 3, 4)  # stride-0 source into a dense buffer
    assert st.bind([e]) == 1 and torch.equal(st.tensors[0], e)
    with torch.inference_mode():
        c = torch.randn(2, 3, 4)  # inference tensor: no version counter
    assert st.bind([c]) == 1 and st.bind([c]) == 0 and st.bind([c[0:2]]) == 0
    del c  # still held by the binding: its memory cannot come back as another tensor's
    assert st.bind([torch.zeros(2, 3, 4)]) == 1 and not st.tensors[0].any()
    st.invalidate()
    assert st.bind([st.tensors[0].clone()]) == 1


class EagerGraph:
    """A stand-in for ``CudaGraph`` on any device: "replay" runs the function on the static
    inputs, so a copy the binding wrongly skipped gives a wrong answer."""

    captures = 0

    def __init__(self, fn, inputs, pool) -> None:
        self.fn, self.inputs = fn, inputs
        EagerGraph.captures += 1

    def replay(self):
        return tuple(o.clone() for o in self.fn(*self.inputs))


@torch.no_grad()
def test_runner_graphs_share_image_inputs_and_copy_them_once_per_image(ckpt):
    pred = Predictor(ckpt, device="cpu", backend="torch")
    dec = pred.model.mask_decoder
    embs = [pred.embed(_image(i)) for i in range(2)]
    runner = DecoderRunner(
        dec.predict_masks, (1, 4), cuda_graphs=True, prepare=dec.prepare_fused,
        graph_cls=EagerGraph,
    )  # fmt: skip
    pe = pred._image_pe
    h = embs[0].image_embeddings.shape[-1]
    no_mask = pred.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
    g = torch.Generator().manual_seed(3)
    EagerGraph.captures = 0
    for step, (img, p) in enumerate([(0, 1), (0, 3), (1, 3), (0, 1), (1, 4), (1, 1)]):
        e = embs[img]
        sparse = torch.randn(1, p, 2, 256, generator=g)
        dense = no_mask.expand(1, -1, h, h)  # a new view object every call, as decode()
        args = (e.image_embeddings[0:1], pe, sparse, dense, e.hq_features[0:1])
        masks, iou = runner(*args)
        ref_m, ref_i = dec.predict_masks(*args)
        torch.testing.assert_close(masks, ref_m, msg=f"step {step}")
        torch.testing.assert_close(iou, ref_i, msg=f"step {step}")
    assert EagerGraph.captures == 2  # buckets 1 and 4 (3 -> 4), shared image inputs
    (statics,) = runner.image_inputs.values()
    # emb, pe, dense, hq: 4 on the first call, then emb + hq on each of the 3 image changes.
    assert statics.copies == 4 + 2 * 3


@torch.no_grad()
def test_runner_graphs_threads_on_different_images(ckpt):
    """Two images decoded by 4 threads at once through one runner with (stand-in) graphs: each
    thread gets the answer of the plain decoder."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    pred = Predictor(ckpt, device="cpu", backend="torch")
    dec = pred.model.mask_decoder
    want = {}
    embs = [pred.embed(_image(i)) for i in range(2)]
    for i in range(4):
        pts, lab = _points(1 + i % 2, seed=i)
        want[i] = pred.decode(embs[i % 2], pts, lab, multimask_output=False)
    pred._predict_masks = DecoderRunner(
        dec.predict_masks, (1, 2), True, dec.prepare_fused, graph_cls=EagerGraph
    )
    barrier = threading.Barrier(4, timeout=60)

    def job(i):
        barrier.wait()
        out = []
        for _ in range(3):
            pts, lab = _points(1 + i % 2, seed=i)
            out.append(pred.decode(embs[i % 2], pts, lab, multimask_output=False))
        return out

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(job, range(4)))
    for i in range(4):
        for m, s, low in got[i]:
            np.testing.assert_array_equal(m, want[i][0])
            np.testing.assert_allclose(low, want[i][2], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(s, want[i][1], rtol=1e-5, atol=1e-6)
