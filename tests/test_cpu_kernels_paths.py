"""The kernel path chain (amx -> avx512 -> avx2 -> plain): chosen by the host's features, forced
by HETERO_CPU_KERNEL_PATH, and each format's kernel of a path or of the next one."""

import logging

import pytest

from cpu_kernels import cpu_features
from cpu_kernels.cpu_features import (
    AVX2_FEATURES,
    AVX512_FEATURES,
    KERNEL_PATHS,
    PATH_ENV,
    KernelPathError,
    available_kernel_paths,
    host_kernel_path,
    kernel_of_path,
)

ZEN3 = dict.fromkeys(AVX2_FEATURES, True)
ZEN4 = dict.fromkeys(AVX512_FEATURES, True)
SAPPHIRE_RAPIDS = dict(ZEN4, **{"amx-tile": True, "amx-int8": True, "amx-bf16": True})
SKYLAKE_SERVER = dict(ZEN3, avx512f=True, avx512bw=True, avx512vl=True)  # no VNNI, no BF16


@pytest.fixture
def cpu(monkeypatch):
    """Pretend the host has the given LLVM features (and AMX permission, or not)."""
    monkeypatch.delenv(PATH_ENV, raising=False)

    def pretend(features: dict[str, bool], amx_permitted: bool = True):
        monkeypatch.setattr(cpu_features, "host_cpu_features", lambda: features)
        monkeypatch.setattr(cpu_features, "amx_permitted", lambda: amx_permitted)
        cpu_features._kernel_path.cache_clear()

    yield pretend
    cpu_features._kernel_path.cache_clear()


@pytest.mark.parametrize(
    "features,paths",
    [
        ({}, ("plain",)),
        (ZEN3, ("avx2", "plain")),
        (SKYLAKE_SERVER, ("avx2", "plain")),
        (ZEN4, ("avx512", "avx2", "plain")),
        (SAPPHIRE_RAPIDS, ("amx", "avx512", "avx2", "plain")),
    ],
    ids=["no-avx2", "zen3", "skylake-server", "zen4", "sapphire-rapids"],
)
def test_host_runs_the_first_path_whose_features_it_has(cpu, features, paths):
    cpu(features)
    assert available_kernel_paths() == paths
    assert host_kernel_path() == paths[0]


def test_amx_refused_by_linux_falls_back_to_avx512(cpu):
    cpu(SAPPHIRE_RAPIDS, amx_permitted=False)
    assert host_kernel_path() == "avx512"


def test_amx_permission_is_asked_of_linux_once_and_a_refusal_logged(caplog):
    cpu_features.amx_permitted.cache_clear()
    with caplog.at_level(logging.WARNING, logger=cpu_features.__name__):
        permitted = cpu_features.amx_permitted()
        assert cpu_features.amx_permitted() is permitted  # cached: asked once
    if not cpu_features.host_cpu_features().get("amx-tile"):
        assert not permitted  # Linux refuses tile data where the CPU has none
    warnings = [record.getMessage() for record in caplog.records]
    assert warnings == [] if permitted else len(warnings) == 1 and "refused" in warnings[0]


@pytest.mark.parametrize("path", KERNEL_PATHS)
def test_any_path_the_cpu_runs_can_be_forced(cpu, monkeypatch, path):
    cpu(SAPPHIRE_RAPIDS)
    monkeypatch.setenv(PATH_ENV, path)
    assert host_kernel_path() == path


@pytest.mark.parametrize("forced,why", [("sse9", "no such path"), ("avx512", "this CPU lacks it")])
def test_forcing_an_unknown_path_or_one_the_cpu_lacks_fails_in_one_line(
    cpu, monkeypatch, forced, why
):
    cpu(ZEN3)
    monkeypatch.setenv(PATH_ENV, forced)
    with pytest.raises(KernelPathError, match=f"{PATH_ENV}='{forced}': {why}") as error:
        host_kernel_path()
    assert "\n" not in str(error.value) and "avx2, plain" in str(error.value)


def test_a_format_without_a_kernel_of_a_path_runs_the_next_paths():
    kernels = {"avx2": "avx2 kernel", "plain": "plain kernel"}
    assert [kernel_of_path(kernels, path) for path in KERNEL_PATHS] == [
        "avx2 kernel",
        "avx2 kernel",
        "avx2 kernel",
        "plain kernel",
    ]


def test_an_unknown_path_asked_of_a_format_is_refused():
    with pytest.raises(KernelPathError, match="no kernel path 'sse9'"):
        kernel_of_path({"plain": "plain kernel"}, "sse9")
