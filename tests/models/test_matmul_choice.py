"""The CPU matmul library chosen by measurement (`blip.models.kernels.cpu_matmul`): a fake probe decides, the
setting overrides it, the choice is made once per process, and a failing probe keeps the oneDNN default."""

from __future__ import annotations

import json
import logging
import math

import pytest

from blip.models import kernels


@pytest.fixture
def choice(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """`cpu_matmul` made afresh with a fake probe (`calls` counts its runs) on an x86 CPU with a working oneDNN op."""
    calls: list[int] = []
    timings: dict[str, dict[str, tuple[float, ...]]] = {}

    def fake_probe() -> dict[str, tuple[float, ...]]:
        calls.append(1)
        if "error" in timings:
            raise RuntimeError("no oneDNN kernel for this CPU")
        return timings["ms"]

    real = kernels.cpu_matmul()  # this process's own choice, put back afterwards (no second real probe)
    monkeypatch.delenv("BLIP_CPU_MATMUL", raising=False)
    monkeypatch.setenv("BLIP_CACHE_DIR", str(tmp_path / "cache"))  # probed choices are kept here, not in ~/.cache
    monkeypatch.setattr(kernels, "_probe", fake_probe)
    monkeypatch.setattr(kernels, "_onednn_works", lambda: True)
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    kernels.cpu_matmul.cache_clear()

    def make(onednn: tuple[float, ...] = (), mkl: tuple[float, ...] = (), error: bool = False) -> kernels.MatmulChoice:
        timings.clear()
        kernels.choice_file().unlink(missing_ok=True)  # each call probes afresh
        timings["ms"] = {"onednn": onednn, "mkl": mkl}
        if error:
            timings["error"] = {}
        kernels.cpu_matmul.cache_clear()
        return kernels.cpu_matmul()

    make.calls = calls  # type: ignore[attr-defined]
    yield make
    kernels.cpu_matmul.cache_clear()
    monkeypatch.delenv("BLIP_CPU_MATMUL", raising=False)
    monkeypatch.setattr(kernels, "_choose", lambda setting: real)
    kernels.cpu_matmul()  # cached again: the tests after see the real choice


def test_probe_picks_the_faster_library_and_keeps_onednn_on_a_near_tie(choice) -> None:
    amd = choice(onednn=(1.3, 1.2), mkl=(2.9, 1.8))  # this machine's numbers: oneDNN 2.2x / 1.5x faster
    assert (amd.library, amd.reason) == ("onednn", "probe") and kernels.onednn_linear_available()
    intel = choice(onednn=(1.0, 1.0), mkl=(0.85, 0.88))  # MKL 12-18% faster, as on the H200's Xeon
    assert (intel.library, intel.reason) == ("mkl", "probe") and not kernels.onednn_linear_available()
    assert intel.probe_ms == {"onednn": (1.0, 1.0), "mkl": (0.85, 0.88)}
    tie = choice(onednn=(1.0, 1.0), mkl=(0.95, 0.97))  # within the margin: the default stays
    assert tie.library == "onednn"
    mixed = choice(onednn=(1.0, 1.0), mkl=(0.5, 1.9))  # geometric mean 0.97: a tie
    assert mixed.library == "onednn"


def test_leaving_onednn_takes_two_agreeing_probes_and_the_choice_is_made_once(choice) -> None:
    choice(onednn=(1.0, 1.0), mkl=(0.5, 0.5))
    assert len(choice.calls) == 2  # MKL faster: probed a second time before switching
    for _ in range(5):
        assert kernels.cpu_matmul().library == "mkl"
    assert len(choice.calls) == 2  # cached for the process
    choice.calls.clear()
    choice(onednn=(0.5, 0.5), mkl=(1.0, 1.0))
    assert len(choice.calls) == 1


def test_setting_overrides_the_probe(choice, monkeypatch: pytest.MonkeyPatch) -> None:
    for setting, library in [("mkl", "mkl"), ("aten", "mkl"), ("onednn", "onednn"), (" OneDNN ", "onednn")]:
        monkeypatch.setenv("BLIP_CPU_MATMUL", setting)
        picked = choice(onednn=(0.1, 0.1), mkl=(9.0, 9.0)) if library == "mkl" else choice(onednn=(9.0,), mkl=(0.1,))
        assert picked.library == library and picked.reason.startswith("BLIP_CPU_MATMUL=")
    assert not choice.calls  # the probe never ran
    monkeypatch.setenv("BLIP_CPU_MATMUL", "auto")
    assert choice(onednn=(9.0,), mkl=(0.1,)).library == "mkl"
    monkeypatch.setenv("BLIP_CPU_MATMUL", "openblas")
    with pytest.raises(ValueError, match="BLIP_CPU_MATMUL must be auto, onednn or mkl"):
        choice(onednn=(1.0,), mkl=(1.0,))


def test_a_failing_or_broken_probe_keeps_the_default(choice) -> None:
    failed = choice(error=True)
    assert failed.library == "onednn" and "probe failed: RuntimeError: no oneDNN kernel" in failed.reason
    nonsense = choice(onednn=(0.0, 1.0), mkl=(1.0, math.nan))  # a zero or NaN time decides nothing
    assert nonsense.library == "onednn" and "probe failed" in nonsense.reason
    assert choice(onednn=(), mkl=()).library == "onednn"


def test_no_probe_where_onednn_is_missing_or_off_x86(choice, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_onednn_works", lambda: False)
    assert choice(onednn=(0.1,), mkl=(9.0,)).library == "mkl"
    monkeypatch.setattr(kernels, "_onednn_works", lambda: True)
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")
    arm = choice(onednn=(0.1,), mkl=(9.0,))
    assert (arm.library, arm.reason) == ("mkl", "not x86 (aarch64)") and not choice.calls


def test_choice_is_logged_at_debug(choice, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="blip.models.kernels"):
        choice(onednn=(1.25, 1.5), mkl=(2.5, 3.0))
    assert "CPU linears: onednn (probe: onednn 1.25 / 1.50 ms; mkl 2.50 / 3.00 ms)" in caplog.text


def test_real_probe_times_both_libraries() -> None:
    if not kernels._onednn_works():
        pytest.skip("no oneDNN linear op on this build")
    timings = kernels.probe_matmul(((8, 64, 96, 1), (1, 64, 96, 2)))
    assert set(timings) == {"onednn", "mkl"}
    assert all(len(ms) == 2 and all(0 < t < 1000 for t in ms) for ms in timings.values())
    assert kernels.pick_library(timings) in ("onednn", "mkl")


def test_a_probed_choice_is_kept_for_later_processes(choice, monkeypatch: pytest.MonkeyPatch) -> None:
    first = choice(onednn=(1.0, 1.0), mkl=(0.5, 0.5))
    assert first.library == "mkl" and len(choice.calls) == 2
    saved = json.loads(kernels.choice_file().read_text())
    assert saved[kernels.machine_key()]["library"] == "mkl"
    kernels.cpu_matmul.cache_clear()  # a later process on this machine: no probe, the same library
    later = kernels.cpu_matmul()
    assert (later.library, later.reason, later.probe_ms) == ("mkl", "probed before", first.probe_ms)
    assert len(choice.calls) == 2
    monkeypatch.setattr(kernels, "machine_key", lambda: "another CPU | torch 9")  # another machine: probes
    kernels.cpu_matmul.cache_clear()
    assert kernels.cpu_matmul().reason == "probe" and len(choice.calls) == 4
    assert set(json.loads(kernels.choice_file().read_text())) == {saved_key for saved_key in saved} | {
        "another CPU | torch 9"
    }
    kernels.choice_file().write_text("{not json")  # a broken cache file: probed again, and rewritten
    kernels.cpu_matmul.cache_clear()
    assert kernels.cpu_matmul().reason == "probe"
    assert json.loads(kernels.choice_file().read_text())["another CPU | torch 9"]["library"] == "mkl"


def test_a_failed_probe_is_not_kept(choice) -> None:
    assert choice(error=True).library == "onednn"
    assert not kernels.choice_file().exists()


def test_threads_reaching_their_first_linear_together_probe_once(choice) -> None:
    """A server's first requests arrive together: one probe (it sets the process's thread count), one verdict."""
    import threading
    import time

    real_probe = kernels._probe

    def slow_probe() -> dict[str, tuple[float, ...]]:
        time.sleep(0.1)
        return real_probe()

    choice(onednn=(1.0, 1.0), mkl=(2.0, 2.0))
    kernels.choice_file().unlink()
    kernels.cpu_matmul.cache_clear()
    choice.calls.clear()
    kernels._probe = slow_probe  # the fixture's monkeypatch puts the real one back
    results: list[kernels.MatmulChoice] = []
    threads = [threading.Thread(target=lambda: results.append(kernels.cpu_matmul())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(choice.calls) == 1 and {r.library for r in results} == {"onednn"}


def test_no_home_folder_skips_the_cache_instead_of_failing(choice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process whose user has no home (HOME unset, no passwd entry) still computes: the choice is just not kept."""
    from pathlib import Path

    def no_home(self: Path) -> Path:
        raise RuntimeError("Could not determine home directory.")

    choice(onednn=(1.0, 1.0), mkl=(2.0, 2.0))  # the fake probe's timings
    monkeypatch.delenv("BLIP_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(Path, "expanduser", no_home)
    kernels.cpu_matmul.cache_clear()
    made = kernels.cpu_matmul()
    assert (made.library, made.reason) == ("onednn", "probe")
