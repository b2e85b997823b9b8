"""The fused C correspondence kernels: build, fallbacks, exactness against torch and naive refs.

These tests build the real kernels with this machine's C compiler (skipped only where there is
none); nothing is mocked except a deliberately broken compiler and a deliberately wrong kernel.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from datagen.capture import fused
from datagen.capture.correspondence import compute_correspondence
from tests.test_correspondence import (
    DIM,
    GH,
    GW,
    _assert_matches_reference,
    _random_inputs,
    naive_correspondence,
)

pytestmark = pytest.mark.skipif(fused._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_kernels(tmp_path, monkeypatch):
    """kernels() recomputed under a private cache dir; the shared cached answer is restored."""
    monkeypatch.setenv("DATAGEN_CACHE_DIR", str(tmp_path))
    fused.kernels.cache_clear()
    yield tmp_path
    fused.kernels.cache_clear()


def test_kernels_build_once_into_the_cache_dir(fresh_kernels):
    lib = fused.kernels()
    assert lib is not None
    built = list((fresh_kernels / "kernels").glob("corr_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    fused.kernels.cache_clear()
    assert fused.kernels() is not None
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert list((fresh_kernels / "kernels").iterdir()) == built  # no temporary files left


def test_broken_compiler_falls_back_to_torch_with_a_warning(fresh_kernels, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # exists everywhere, always fails
    with caplog.at_level(logging.WARNING, logger="datagen.capture.fused"):
        assert fused.kernels() is None
    assert "could not build corr_kernels.c" in caplog.text
    q, k, kt, qt = _random_inputs(torch.float32, seed=11)
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW))  # torch path
    _assert_matches_reference(res, naive_correspondence(q, k, qt, kt, DIM**-0.5, (GH, GW)), 1e-5)
    with pytest.raises(RuntimeError, match="unavailable"):
        compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=True)


def test_disabled_by_environment(fresh_kernels, monkeypatch):
    monkeypatch.setenv("DATAGEN_FUSED", "0")
    assert fused.kernels() is None
    assert not list(fresh_kernels.glob("**/*.so"))  # nothing was built


def test_a_library_that_disagrees_with_torch_is_not_used(fresh_kernels, monkeypatch, caplog):
    real = fused._run_reverse

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) + 1

    monkeypatch.setattr(fused, "_run_reverse", wrong)
    with caplog.at_level(logging.WARNING, logger="datagen.capture.fused"):
        assert fused.kernels() is None
    assert "disagree with torch" in caplog.text


def test_fused_true_needs_float_work_on_the_cpu():
    q, k, kt, qt = _random_inputs(torch.float64)
    with pytest.raises(RuntimeError, match="CPU only"):
        compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=True)


def test_exp2_is_accurate_to_float_rounding():
    x = torch.cat([torch.linspace(-126.0, 0.0, 2_000_001), torch.tensor([-0.5, 0.5 - 1, -1e-30])])
    got = fused.exp2(x).double()
    ref = torch.exp2(x.double())
    rel = ((got - ref) / ref).abs()
    assert rel.max().item() < 2.5e-7
    assert fused.exp2(torch.tensor([0.0])).item() == 1.0
    below = fused.exp2(torch.tensor([-126.5, -150.0, -1e4, -float("inf")]))
    assert torch.equal(below, torch.zeros(4))  # underflow is exactly zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_pack_keys_is_exact_for_every_input_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    heads, width, text, d = 2, 37, 5, 6  # 42 keys: three panels, the last one padded
    keys = (torch.randn(heads, width, d, generator=g) * 3).to(dtype)
    special = torch.tensor([0.0, -0.0, 1e-7, -3e-6, 6e-5, 65504.0, float("inf"), float("nan")])
    keys[0, :, 0] = special.to(dtype).repeat(5)[:width]
    txt = (torch.randn(heads, text, d, generator=g)).to(dtype)
    scale = 0.37
    packed = fused.pack_keys(keys, txt, scale)
    joint = torch.cat([txt, keys], 1).float() * torch.tensor(scale * fused.LOG2E)
    padded = torch.cat([joint, torch.zeros(heads, 48 - 42, d)], 1)
    ref = padded.view(heads, 3, 16, d).transpose(2, 3)
    assert packed.shape == (heads, 3, d, 16)
    torch.testing.assert_close(packed, ref, rtol=0, atol=0, equal_nan=True)


def test_pack_keys_widens_mixed_dtypes():
    keys = torch.randn(1, 16, 4, dtype=torch.float16)
    text = torch.randn(1, 3, 4, dtype=torch.float32)  # not representable in fp16
    packed = fused.pack_keys(keys, text, 1.0)
    assert torch.equal(packed[0, 0, :, :3], (text[0].T * torch.tensor(fused.LOG2E)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("text", [True, False])
def test_fused_path_matches_naive_reference(dtype, text):
    q, k, kt, qt = _random_inputs(dtype, text=text, seed=12)
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=True)
    ref = naive_correspondence(q, k, qt, kt, DIM**-0.5, (GH, GW))  # float64, same input values
    _assert_matches_reference(res, ref, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("group", [1, 5, 6, 7, 200])
def test_threads_and_groups_do_not_change_results(threads, group):
    g = torch.Generator().manual_seed(3)
    heads, rows, tokens, frames, text, d = 4, 23, 29, 3, 9, 16  # nothing a multiple of 6 or 16
    q = torch.randn(heads, rows, d, generator=g)
    keys = torch.randn(heads, frames * tokens, d, generator=g)
    ktext = torch.randn(heads, text, d, generator=g)
    lib = fused.kernels()
    kp0 = fused.pack_keys(keys[:, :tokens])
    rev = fused._run_reverse(lib, q, kp0, tokens, threads=threads, group=group)
    assert torch.equal(rev, torch.softmax(q @ keys[:, :tokens].mT, -1).sum(0).argmax(-1))
    kp = fused.pack_keys(keys, ktext)
    pair, full, mass = fused._run_forward(
        lib, q, kp, text, frames, tokens, threads=threads, group=group
    )
    logits = q @ torch.cat([ktext, keys], 1).mT
    ref_full = torch.softmax(logits, -1).sum(0)
    ref_pair = torch.softmax(logits[..., text:].unflatten(-1, (frames, tokens)), -1).sum(0)
    torch.testing.assert_close(pair, ref_pair, rtol=0, atol=2e-6)
    torch.testing.assert_close(
        full, ref_full[..., text:].unflatten(-1, (frames, tokens)), rtol=0, atol=2e-6
    )
    torch.testing.assert_close(mass[:, 0], ref_full[..., :text].sum(-1), rtol=0, atol=2e-6)


def test_a_frame_far_below_the_row_maximum_keeps_full_precision():
    """Frame 2's logits sit ~300 below frame 0's: its exponentials relative to the row's
    maximum underflow to zero, so the kernel must redo that frame relative to its own maximum
    (the rare path) to keep the frame-pair softmax exact."""
    q, k, kt, qt = _random_inputs(torch.float32, seed=13, spread=1.0)
    heads, frames, tokens, d = q.shape
    direction = torch.randn(heads, 1, d, generator=torch.Generator().manual_seed(1))
    direction /= direction.norm(dim=-1, keepdim=True)
    q[:, 0] += 8 * direction  # every frame-0 query leans along `direction`
    k[:, 2] -= 300 * direction  # frame 2's keys point away: logits ~ -8*300/sqrt(8) ~ -850
    res = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW), fused=True)
    ref = naive_correspondence(q, k, qt, kt, DIM**-0.5, (GH, GW))
    assert ref["mass_per_frame"][:, 2].max() < 1e-30  # the frame really is far below
    assert np.all(ref["match_prob"][:, 2] > 1.5 / tokens)  # yet its own softmax is peaked
    # logits of magnitude ~850 carry ~1e-4 absolute float32 rounding (in any float32 code):
    # the tolerance is 1e-4 here; without the rare path frame 2 would be 0/0 = nan
    _assert_matches_reference(res, ref, atol=1e-4)
    assert torch.all(res.match_prob[:, 2] > 1.5 / tokens)


def _child_uses_the_pool(conn) -> None:
    conn.send(fused._parallel(lambda a, b: (a, b), 8, 2))


def test_a_forked_child_gets_its_own_thread_pool():
    """A child forked after the parent used the pool inherits the pool object but not its
    threads; without the at-fork reset, its first task would wait forever. (torch's own
    OpenMP pool has the same problem with fork, for every torch op: use spawn for workers.)"""
    import multiprocessing as mp

    assert fused._parallel(lambda a, b: (a, b), 8, 2) == [(i, i + 1) for i in range(8)]
    assert 2 in fused._pools
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_uses_the_pool, args=(send,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung on the inherited thread pool")
    assert child.exitcode == 0
    assert recv.recv() == [(i, i + 1) for i in range(8)]


def test_default_path_depends_on_the_amount_of_work(monkeypatch):
    calls = []
    real = fused.reverse

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "reverse", spy)
    q, k, kt, qt = _random_inputs(torch.float16, seed=15)  # ~20 k multiply-adds: torch path
    small = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW))
    assert calls == []
    monkeypatch.setattr("datagen.capture.correspondence.FUSED_MIN_WORK", 0)
    big = compute_correspondence(q, k, qt, k_text=kt, grid_hw=(GH, GW))
    assert calls == [1]
    assert torch.equal(small.match_reverse, big.match_reverse)
    torch.testing.assert_close(small.confidence, big.confidence, rtol=0, atol=1e-6)


def test_packed_keys_that_do_not_fit_are_refused():
    q = torch.randn(2, 5, 4)
    kp = fused.pack_keys(torch.randn(2, 20, 4))  # 32 padded keys
    lib = fused.kernels()
    for bad_kp, keys in (
        (kp, 33),  # more keys than packed
        (kp[:1].contiguous(), 20),  # heads differ
        (kp.double(), 20),  # not float32
        (kp.transpose(2, 3), 20),  # not the panel layout
    ):
        with pytest.raises(ValueError, match="not pack_keys output"):
            fused._run_reverse(lib, q, bad_kp, keys, threads=1)
    assert fused._run_reverse(lib, q, kp, 20, threads=1).shape == (5,)
