"""Background threads (the loader's prefetch) run torch ops on themselves alone, without
changing the thread count of the training step's thread."""

from __future__ import annotations

import threading

import pytest
import torch

from sae_clt.threads import _openmp_runtimes, prefetched, use_one_torch_thread

needs_openmp = pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info() or not _openmp_runtimes(),
                                  reason="torch here does not parallelise with a findable OpenMP runtime")


def in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", fn()))
    thread.start()
    thread.join()
    return out["value"]


@needs_openmp
def test_one_torch_thread_applies_to_the_calling_thread_only():
    main_before = torch.get_num_threads()

    def limited():
        applied = use_one_torch_thread()
        x = torch.randn(300_000)
        (x > 0).nonzero()  # a parallel op, run on this thread
        return applied, torch.get_num_threads()

    assert in_thread(limited) == (True, 1)
    assert torch.get_num_threads() == main_before  # the caller of the training step keeps its threads
    assert in_thread(torch.get_num_threads) == main_before  # and threads started later get the usual count


@needs_openmp
def test_prefetch_thread_runs_its_torch_ops_single_threaded():
    main_before = torch.get_num_threads()

    def counts():
        for _ in range(3):
            yield torch.get_num_threads()  # evaluated on the prefetch thread

    assert list(prefetched(counts())) == [1, 1, 1]
    assert torch.get_num_threads() == main_before
