"""What `blip` says while it works: `-v` after any command logs the loading details, and a slow step gets a status
line on a terminal's stderr (never on stdout, never into a pipe). Through the real command in a subprocess."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys

import pytest

from blip.cli import PASSTHROUGH, build_parser
from oracle import TinySpec, make_images

CAPTION = TinySpec(kind="caption", seed=21)


@pytest.fixture
def image(tmp_path) -> str:
    path = tmp_path / "img.png"
    make_images(1, seed=3)[0].save(path)
    return str(path)


def blip_command(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blip.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


@pytest.mark.parametrize("where", ["after", "before"])
def test_verbose_logs_the_loading_details(hf_checkpoints, image, where):
    folder = str(hf_checkpoints(CAPTION))
    command = ["caption", "-v"] if where == "after" else ["-v", "caption"]
    args = [*command, "--model", folder, image]
    done = blip_command(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(image + "\t")
    info = [line for line in done.stderr.splitlines() if line.startswith("INFO ")]
    text = "\n".join(info)
    assert f"loaded {folder} in " in text and "a 'caption' model (" in text and "float32 on cpu" in text
    assert "model.safetensors (hf layout)" in text


def test_without_verbose_loading_is_quiet(hf_checkpoints, image):
    done = blip_command("caption", "--model", str(hf_checkpoints(CAPTION)), image, env={"BLIP_STATUS_AFTER_S": "0"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # not a terminal: no status lines either


def test_verbose_is_accepted_after_every_command():
    parser = build_parser()
    required = {
        "caption": ["--model", "m", "a.png"],
        "vqa": ["--model", "m", "--image", "a.png", "--question", "q"],
        "match": ["--model", "m", "--image", "a.png", "--text", "t"],
        "similarity": ["--model", "m", "--image", "a.png", "--text", "t"],
        "explain": ["--model", "m", "--image", "a.png", "--text", "t", "--out", "maps"],
        "reason": ["--model", "m", "--image-a", "a.png", "--image-b", "b.png", "--statement", "s"],
        "convert": ["src", "out"],
        "export": ["--model", "m", "--out", "dir"],
        "list": [],
        "data": ["shapes"],
        "demo": [],
    }
    commands = [name for name in parser._subparsers._group_actions[0].choices if name not in PASSTHROUGH]
    assert sorted(commands) == sorted(required)
    for command in commands:
        for flag in ("-v", "--verbose"):
            assert parser.parse_args([command, flag, *required[command]]).verbose, command
        assert not parser.parse_args([command, *required[command]]).verbose, command


def test_convert_verbose_reports_the_source_layout(hf_checkpoints, tmp_path):
    done = blip_command("convert", "-v", str(hf_checkpoints(CAPTION)), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert "INFO " in done.stderr and "wrote" in done.stdout


def _run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """The command with stderr on a pseudo-terminal (as in an interactive shell) and stdout in a pipe."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip.cli", *args],
        stdout=subprocess.PIPE,
        stderr=terminal,
        env={**os.environ, **env},
        text=True,
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    out = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=120), out, b"".join(chunks).decode()


def test_slow_steps_get_a_status_line_on_a_terminal(hf_checkpoints, image):
    folder = str(hf_checkpoints(CAPTION))
    code, out, err = _run_on_a_terminal(
        ["caption", "--model", folder, image, "--format", "jsonl"], env={"BLIP_STATUS_AFTER_S": "0"}
    )
    assert code == 0, err
    assert f"blip caption: loading {folder} ..." in err
    assert "blip caption: captioning 1 image ..." in err
    rows = [json.loads(line) for line in out.splitlines()]  # stdout stays pure JSONL
    assert [row["image"] for row in rows] == [image]


def test_fast_steps_stay_silent_on_a_terminal(hf_checkpoints, image):
    code, _, err = _run_on_a_terminal(
        ["caption", "--model", str(hf_checkpoints(CAPTION)), image], env={"BLIP_STATUS_AFTER_S": "600"}
    )
    assert code == 0 and "blip caption:" not in err


def test_one_shot_commands_set_passive_openmp_before_torch_is_loaded():
    """`blip caption|vqa|match|similarity` set OMP_WAIT_POLICY=PASSIVE (unless the user chose) before torch, hence
    OpenMP, is loaded; `import blip` and `import blip.cli` no longer import torch; the public names still resolve.
    Other commands keep OpenMP's default."""
    code = (
        "import os, sys; from blip.cli import main; print('torch' in sys.modules);"
        "main(sys.argv[1:]); print(os.environ.get('OMP_WAIT_POLICY'));"
        "import blip; print(all(getattr(blip, name) is not None for name in blip.__all__))"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}

    def policy(*argv: str, extra: dict[str, str] | None = None) -> list[str]:
        done = subprocess.run(
            [sys.executable, "-c", code, *argv], capture_output=True, text=True, env={**env, **(extra or {})}
        )
        return done.stdout.split()

    missing = ["--model", "/nonexistent/model", "a.png"]
    assert policy("caption", *missing) == ["False", "PASSIVE", "True"]
    assert policy("caption", *missing, extra={"OMP_WAIT_POLICY": "ACTIVE"}) == ["False", "ACTIVE", "True"]
    assert policy("convert", "/nonexistent/model.pth", "out") == ["False", "None", "True"]


def test_help_and_the_command_parser_do_not_load_torch():
    """`blip --help` and the one-shot commands' parsers (with their `--device` flag) are built without torch: the
    device check loads it lazily, after the command chose OpenMP's wait policy."""
    code = "import sys; from blip.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.split()[:1] == ["False"], done.stderr
