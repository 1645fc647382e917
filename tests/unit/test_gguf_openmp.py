"""The warning a worker logs when its llama.cpp would run on sleeping OpenMP threads."""

from __future__ import annotations

from workers.loading.gguf import openmp_passive_warning

OPENMP_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | "
OWN_POOL_BUILD = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | LLAMAFILE = 1 | REPACK = 1 | "


def test_an_openmp_build_under_a_passive_policy_is_named_with_the_fix() -> None:
    warning = openmp_passive_warning(OPENMP_BUILD, "PASSIVE")
    assert warning is not None
    assert "OMP_WAIT_POLICY=PASSIVE" in warning and "-DGGML_OPENMP=OFF" in warning
    assert openmp_passive_warning(OPENMP_BUILD, "passive") == warning


def test_no_warning_for_ggmls_own_pool_or_a_spinning_policy() -> None:
    assert openmp_passive_warning(OWN_POOL_BUILD, "PASSIVE") is None
    assert openmp_passive_warning(OPENMP_BUILD, None) is None
    assert openmp_passive_warning(OPENMP_BUILD, "ACTIVE") is None
