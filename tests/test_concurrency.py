"""Many threads on one Predictor: the first-use lock, and answers equal to the sequential ones.

Threads are released together by a barrier, so their calls really overlap (first use of a shape
included: that is where Triton autotunes, ``torch.compile`` compiles and CUDA graphs are
captured)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from samhq_fast.predictor import Predictor
from samhq_fast.runtime import FirstUseGuard, FirstUseLock

from _device import TRITON_DEVICE
from _weights import build_official, perturb_, save_official_pth, small_config

N_THREADS = 4
CFG = small_config(128, hidden=64, depth=2, heads=2, window=3, global_idx=(1,))


def _run_together(n: int, job) -> list:
    """``job(i)`` on ``n`` threads released at once; returns the results in order."""
    barrier = threading.Barrier(n, timeout=60)

    def run(i):
        barrier.wait()
        return job(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_first_use_runs_alone_and_seen_shapes_run_together():
    lock = FirstUseLock()
    active, peak, calls = [0], [0], []
    state = threading.Lock()
    inside = threading.Barrier(N_THREADS, timeout=10)

    second_round = False

    def fn(x: torch.Tensor) -> int:
        with state:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            calls.append(x.shape[0])
        if second_round:
            inside.wait()  # passes only if all N calls are inside fn at the same time
        else:
            time.sleep(0.05)  # give the other threads time to (wrongly) enter
        with state:
            active[0] -= 1
        return x.shape[0]

    guard = FirstUseGuard(fn, lock)
    # Round 1: every thread calls a shape never seen -> each first use runs alone.
    got = _run_together(N_THREADS, lambda i: guard(torch.zeros(1 + i)))
    assert got == [1 + i for i in range(N_THREADS)]
    assert peak[0] == 1, "a first use overlapped another call"
    # Round 2: shapes seen -> all N calls are inside fn together (the barrier in fn passes).
    peak[0], second_round = 0, True
    assert _run_together(N_THREADS, lambda i: guard(torch.zeros(1))) == [1] * N_THREADS
    assert peak[0] == N_THREADS


def test_exclusive_is_reentrant_and_excludes_readers():
    lock = FirstUseLock()
    order = []
    with lock.exclusive():
        with lock.exclusive(), lock.shared():  # same thread: no deadlock
            order.append("nested")

        def reader():
            with lock.shared():
                order.append("reader")

        t = threading.Thread(target=reader)
        t.start()
        t.join(0.2)
        assert order == ["nested"], "a reader got in during an exclusive section"
    t.join(5)
    assert order == ["nested", "reader"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("conc") / "m.pth"
    save_official_pth(perturb_(build_official(CFG), seed=4), path)
    return path


def _image(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (90 + 7 * i, 120, 3), dtype=np.uint8)


def _prompt(i: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + i)
    p = 1 + i % 3  # prompt counts differ between threads: several first uses at once
    return rng.uniform(0, 90, (p, 2, 2)), np.tile([1, 0], (p, 1))


def _job(pred: Predictor):
    def job(i: int):
        emb = pred.embed(_image(i % 2))
        pts, lab = _prompt(i)
        masks, scores, low = pred.decode(emb, pts, lab, multimask_output=False)
        return emb.image_embeddings.cpu(), masks, scores, low

    return job


@pytest.mark.parametrize(
    ("backend", "compile"),
    [("reference", False), ("torch", False), ("triton", False), ("torch", "aot_eager")],
    ids=["reference", "torch", "triton", "compile"],
)
@torch.no_grad()
def test_threads_get_their_sequential_answers(ckpt, backend, compile):
    if backend == "triton":
        pytest.importorskip("triton")
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if compile:
        torch._dynamo.reset()
    # The predictor meets its shapes for the first time inside the threads; then the same
    # calls again, one at a time (the interpreter and compile are slow: no second predictor).
    shared = Predictor(ckpt, device=device, backend=backend, compile=compile, cuda_graphs=False)
    got = _run_together(N_THREADS, _job(shared))
    want = [_job(shared)(i) for i in range(N_THREADS)]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g[0], w[0], rtol=1e-5, atol=1e-5, msg=f"thread {i} embedding")
        assert g[1].shape == w[1].shape == (1 + i % 3, 1, 90 + 7 * (i % 2), 120)
        np.testing.assert_allclose(g[3], w[3], rtol=1e-4, atol=1e-4, err_msg=f"thread {i}")
        np.testing.assert_allclose(g[2], w[2], rtol=1e-4, atol=1e-5, err_msg=f"thread {i}")


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_threads_during_graph_capture(ckpt):
    """CUDA graphs captured while other threads embed and decode: every thread gets what one
    thread alone gets (a global-mode capture would abort on the other threads' CUDA calls)."""
    shared = Predictor(ckpt, device="cuda", dtype="bf16", backend="triton", cuda_graphs=True)
    got = _run_together(N_THREADS, _job(shared))
    assert len(shared._predict_masks.graphs) >= 2
    alone = Predictor(ckpt, device="cuda", dtype="bf16", backend="triton", cuda_graphs=True)
    want = [_job(alone)(i) for i in range(N_THREADS)]
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g[0], w[0], msg=f"thread {i} embedding")
        np.testing.assert_allclose(g[3], w[3], rtol=1e-3, atol=1e-3, err_msg=f"thread {i}")
