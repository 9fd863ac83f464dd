"""`blip serve` as a user runs it: a subprocess on 127.0.0.1 that loads a model, answers, logs JSON lines, and stops
cleanly on SIGTERM."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import httpx
import pytest
from serve_helpers import ServeProcess, b64, free_port, png_bytes

import blip
from blip.serve import ServeSettings
from blip.serve.cli import BATCHING_FLAGS, LIMIT_FLAGS, build_parser, cli_main, parse_models, settings_from_args
from conftest import CAPTION, VQA


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "blip.serve.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_parse_models():
    assert parse_models(["cap=/a/b", "/x/vqa-model/"]) == {"cap": "/a/b", "vqa-model": "/x/vqa-model/"}
    assert parse_models(["Salesforce/blip-vqa-base"]) == {"blip-vqa-base": "Salesforce/blip-vqa-base"}
    with pytest.raises(ValueError, match="used twice"):
        parse_models(["a=/x", "a=/y"])


def test_flags_become_settings():
    args = build_parser().parse_args(
        ["--model", "x", "--no-batching", "--queue-size", "5", "--cors-origin", "https://a"]
    )
    settings = settings_from_args(args)
    assert settings.max_batch == 1 and settings.queue_size == 5 and settings.cors_origins == ("https://a",)
    assert settings.host == "127.0.0.1" and settings.token is None


def test_every_limit_flag_defaults_to_its_setting_and_sets_it():
    """The limit flags come from one table (`SettingFlag`): no flags means the settings' defaults, and each flag sets
    its field (MiB flags in bytes)."""
    assert settings_from_args(build_parser().parse_args(["--model", "x"])) == ServeSettings()
    for flag in (*BATCHING_FLAGS, *LIMIT_FLAGS):
        given = 3 if flag.field != "max_inflight_pixels" else 30_000_000
        settings = settings_from_args(build_parser().parse_args(["--model", "x", flag.flag, str(given)]))
        assert getattr(settings, flag.field) == given * flag.unit, flag.flag


def test_usage_errors_exit_2(capsys):
    assert cli_main([]) == 2
    assert cli_main(["--model", "a=/x", "--model", "a=/y"]) == 2
    assert cli_main(["--model", "x", "--token-env", "BLIP_TEST_TOKEN_THAT_IS_NOT_SET"]) == 2
    assert "not set" in capsys.readouterr().err


def test_serves_logs_json_and_stops_on_sigterm(hf_checkpoints, images, tmp_path):
    caption_dir, vqa_dir = hf_checkpoints(CAPTION), hf_checkpoints(VQA)
    args = ["--model", f"cap={caption_dir}", "--model", f"vqa={vqa_dir}", "--max-wait-ms", "2"]
    server = ServeProcess(args, tmp_path / "server.log")
    try:
        server.wait_ready(timeout=90)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            body = {"inputs": {"texts": [["what is it?", "how many?"]], "images": [{"b64": b64(png_bytes(images[0]))}]}}
            r = c.post("/predict", json=body)
            assert r.status_code == 200, r.text
            expected = [a.text for a in blip.load(vqa_dir).answer(images[0], ["what is it?", "how many?"])]
            assert r.json() == {"captions": [{"image_results": expected}]}
        assert server.stop() == 0  # SIGTERM, then up to 30 s
    finally:
        server.stop()  # a no-op once it has stopped
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    access = [entry for entry in lines if entry.get("event") == "request" and entry["route"] == "/predict"]
    assert access and access[0]["status"] == 200 and access[0]["method"] == "POST"
    assert any("models loaded" in entry.get("message", "") for entry in lines)


def test_failed_starts_exit_2_with_one_line_before_listening(hf_checkpoints, collection_dir, tmp_path):
    """Issue 15.7: a start that cannot work (a model that cannot load, a device that is not there, a port in use, an
    index that does not fit the served models) says so in one line and exits 2, before anything listens: no
    traceback, no "Uvicorn running" (it used to log that first, then exit 1)."""
    import torch

    caption = str(hf_checkpoints(CAPTION))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = {
            "missing model": (["--model", str(tmp_path / "missing")], "cannot load it"),
            "unknown device": (["--model", caption, "--device", "foo"], "unknown device"),
            "port in use": (["--model", caption, "--port", str(busy.getsockname()[1])], "in use"),
            "index of another model": (["--model", caption, "--index", f"x={collection_dir}"], "--index x="),
        }
        if not torch.cuda.is_available():
            cases["cuda without CUDA"] = (["--model", caption, "--device", "cuda"], "CUDA")
        procs = {
            name: start([*args, *(["--port", str(free_port())] if "--port" not in args else [])])
            for name, (args, _) in cases.items()
        }
        try:
            for name, proc in procs.items():
                assert proc.wait(120) == 2, name
                err = proc.stderr.read()
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("blip serve: error: "), (name, err)
                assert cases[name][1] in lines[0], (name, lines[0])
                assert "Traceback" not in err and "running on" not in err.lower(), (name, err)
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
