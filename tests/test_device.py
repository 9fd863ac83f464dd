"""Devices (issue 15.2, 15.7): one `resolve_device` checks every device name, `blip.load` and every command line say
what is wrong in one line (exit 2, no traceback), and every command line has the same `--device` default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import blip
from blip.devices import DEFAULT_DEVICE, DeviceError, check_device_name, resolve_device
from oracle import TinySpec, make_images

CAPTION = TinySpec(kind="caption", seed=21)
HAS_CUDA = torch.cuda.is_available()


def _blip_command() -> list[str]:
    """The installed `blip` script next to this interpreter (else the same entry point through -m)."""
    script = Path(sys.executable).parent / "blip"
    return [str(script)] if script.exists() else [sys.executable, "-m", "blip.cli"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("device_images")
    make_images(1, seed=3)[0].save(folder / "a.png")
    return folder


def _assert_one_line_usage_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.skipif(HAS_CUDA, reason="needs a PyTorch without a usable CUDA device")
def test_caption_and_batch_refuse_a_bad_device_in_one_line(hf_checkpoints, image, tmp_path):
    """The real `blip` command (four processes at once: each mostly imports torch)."""
    model = str(hf_checkpoints(CAPTION))
    out = tmp_path / "out"
    cases = {}
    for device, words in [("cuda", ("CUDA", "use cpu")), ("foo", ("unknown device 'foo'",))]:
        cases[("caption", device)] = (["caption", "--model", model, "--device", device, str(image / "a.png")], words)
        batch = ["batch", "caption", "-m", model, "-i", str(image), "-o", str(out), "--device", device]
        cases[("batch", device)] = (batch, words)
    running = {
        key: subprocess.Popen([*_blip_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, (args, _) in cases.items()
    }
    for (command, device), process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        prog = "blip caption: error:" if command == "caption" else "blip batch caption: error:"
        _assert_one_line_usage_error(result, prog, *cases[(command, device)][1])
    assert not out.exists()  # refused before the job touched anything


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if HAS_CUDA else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad, words in [("foo", "unknown device 'foo'"), ("cuda:", "unknown device"), ("meta", "not a device")]:
        with pytest.raises(DeviceError, match=words):
            resolve_device(bad)
        with pytest.raises(DeviceError, match=words):
            check_device_name(bad)
    check_device_name("cuda:3")  # a name only: the machine that runs it may have the GPU
    if not torch.backends.mps.is_available():
        with pytest.raises(DeviceError, match="MPS is not available"):
            resolve_device("mps")


@pytest.mark.skipif(HAS_CUDA, reason="needs a PyTorch without a usable CUDA device")
def test_cuda_without_cuda_is_one_clear_error():
    with pytest.raises(DeviceError) as caught:
        resolve_device("cuda")
    message = str(caught.value)
    assert "\n" not in message and ("CPU-only build" in message or "no CUDA GPU" in message)


def test_a_gpu_index_past_the_visible_ones(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:7': only 2 CUDA GPUs visible \(cuda:0 .. cuda:1\)"):
        resolve_device("cuda:7")
    with pytest.raises(DeviceError, match="'cuda:2': only 2 CUDA GPUs"):
        resolve_device("cuda", local_rank=2)  # torchrun with more processes than GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="no CUDA GPU is visible"):
        resolve_device("cuda")


def test_load_checks_the_device_before_reading_anything(tmp_path):
    with pytest.raises(DeviceError, match="unknown device 'foo'"):
        blip.load(tmp_path / "not-even-a-checkpoint", device="foo")


def _device_defaults() -> dict[str, str]:
    """The --device default of every command that has one (and the training config's `device`)."""
    from blip.capfilt.cli import build_parser as capfilt_parser
    from blip.cli import build_parser
    from blip.jobs.cli import build_batch_parser, build_retrieve_parser
    from blip.train.cli import eval_parser
    from blip.train.config import TrainConfig

    main = build_parser()
    commands = {name: main._subparsers._group_actions[0].choices[name] for name in ("caption", "vqa", "match")}
    commands["similarity"] = main._subparsers._group_actions[0].choices["similarity"]
    batch = build_batch_parser()
    for task, parser in batch._subparsers._group_actions[0].choices.items():
        commands[f"batch {task}"] = parser
    commands["retrieve"] = build_retrieve_parser()
    commands["capfilt"] = capfilt_parser()
    commands["eval"] = eval_parser()
    defaults = {name: parser.get_default("device") for name, parser in commands.items()}
    defaults["train (device=)"] = TrainConfig().device
    try:
        from blip.serve.cli import build_parser as serve_parser
    except ImportError:  # the [serve] extra is not installed
        pass
    else:
        defaults["serve"] = serve_parser().get_default("device")
    return defaults


def test_every_command_has_the_same_device_default():
    defaults = _device_defaults()
    assert {"caption", "batch caption", "batch embed", "retrieve", "capfilt", "eval"} <= set(defaults)
    assert set(defaults.values()) == {DEFAULT_DEVICE} == {"auto"}, defaults


def test_every_command_refuses_a_bad_device_with_exit_2(tmp_path, capsys):
    from blip.capfilt.cli import capfilt_main
    from blip.cli import main
    from blip.jobs.cli import batch_main, retrieve_main
    from blip.train.cli import cli_main, eval_main

    calls = {
        "blip caption": lambda: main(["caption", "-m", "x", "a.png", "--device", "foo"]),
        "blip vqa": lambda: main(["vqa", "-m", "x", "--image", "a.png", "--question", "q?", "--device", "foo"]),
        "blip match": lambda: main(["match", "-m", "x", "--image", "a.png", "--text", "t", "--device", "foo"]),
        "blip similarity": lambda: main(
            ["similarity", "-m", "x", "--image", "a.png", "--text", "t", "--device", "foo"]
        ),
        "blip batch caption": lambda: batch_main(
            ["caption", "-m", "x", "-i", str(tmp_path), "-o", "o", "--device", "foo"]
        ),
        "blip retrieve": lambda: retrieve_main(["q", "--index", str(tmp_path), "--device", "foo"]),
        "blip capfilt": lambda: capfilt_main(
            ["--captioner", "x", "--filter", "y", "--data", str(tmp_path), "--out", "o", "--device", "foo"]
        ),
        "blip train": lambda: cli_main([f"data={tmp_path}", "device=foo"]),
        "blip eval": lambda: eval_main(["-m", "x", "--task", "caption", "--data", str(tmp_path), "--device", "foo"]),
    }
    for prog, call in calls.items():
        assert call() == 2, prog
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(prog) and "unknown device 'foo'" in err[0], (prog, err)


def test_serve_refuses_a_bad_device_before_binding(capsys):
    pytest.importorskip("uvicorn")
    from blip.serve.cli import cli_main

    assert cli_main(["--model", "x", "--device", "foo", "--port", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == "blip serve: error: unknown device 'foo': use auto, cpu, cuda, cuda:N or mps"
