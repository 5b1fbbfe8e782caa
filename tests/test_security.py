"""Secrets stay secret and servers stay local.

Servers bind 127.0.0.1 unless told otherwise; ``--api-key`` reaches the servers
and the client (the simulator enforces it); no record, baseline, report or log
we write holds a secret value from the command line, the environment or a
topology file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pytest_mm27.records.store import write_json_atomic
from pytest_mm27.secrets import REDACTED, add_secret, is_secret_name, known_secrets, redact
from pytest_mm27.testing import sim_topology

REPO = Path(__file__).resolve().parents[1]

API_KEY = "s3cr3t-XYZ"
HF_TOKEN = "hf_secret_ABC"
TOPOLOGY_TOKEN = "tok_in_topology_123"

TOPOLOGY = sim_topology("tiny", [1, 2], serve_extra=f'env = {{ MY_API_TOKEN = "{TOPOLOGY_TOKEN}" }}')


def test_secrets_never_reach_records_logs_or_reports(no_leftovers, monkeypatch):
    pytester = no_leftovers
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    pytester.makepyfile(test_throughput="def test_throughput(mm27_level):\n    mm27_level.measure()\n")
    (pytester.path / "topologies").mkdir()
    (pytester.path / "topologies" / "tiny.toml").write_text(TOPOLOGY)
    result = pytester.runpytest_subprocess(
        "--topology-dir", "topologies", "--topology", "tiny", "--workload", "quick", "--engine", "sim",
        "--results-dir", "results", "--api-key", API_KEY, "--report-md", "report.md",
        "--pytest-benchmark-json", "bench.json", "--save-baseline", timeout=180)
    # The servers got the key and the client sent it: every request succeeded.
    result.assert_outcomes(passed=2)
    [record_path] = pytester.path.glob("results/runs/*/tiny.json")
    record = json.loads(record_path.read_text())
    assert all(lv["metrics"]["failed"] == 0 for lv in record["levels"])
    for server in record["launch"]["servers"]:
        assert server["host"] == "127.0.0.1" and server["base_url"].startswith("http://127.0.0.1:")
        argv = server["argv"]
        assert argv[argv.index("--host") + 1] == "127.0.0.1"
        assert argv[argv.index("--api-key") + 1] == REDACTED
    assert record["topology"]["env"]["MY_API_TOKEN"] == REDACTED

    written = [p for p in pytester.path.rglob("*") if p.is_file() and p.suffix in (".json", ".log", ".md", ".png")]
    assert len([p for p in written if p.suffix == ".log"]) == 2
    assert any(p.parts[-3] == "baselines" or "baselines" in p.parts for p in written), "no baseline was saved"
    assert (pytester.path / "report.md").exists() and (pytester.path / "bench.json").exists()
    output = result.stdout.str() + result.stderr.str()
    for secret in (API_KEY, HF_TOKEN, TOPOLOGY_TOKEN):
        assert secret not in output
        for path in written:
            assert secret.encode() not in path.read_bytes(), f"{secret} found in {path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sim_enforces_the_key_binds_loopback_and_never_logs_it(tmp_path):
    port = _free_port()
    log = tmp_path / "sim.log"
    argv = [sys.executable, "-m", "pytest_mm27.sim", "serve", "--port", str(port), "--served-model-name", "m",
            "--hardware", "rtx-pro-6000", "--model", "minimax-m2.7-nvfp4", "--tensor-parallel-size", "2",
            "--max-model-len", "4096", "--api-key", API_KEY]
    with log.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                time.sleep(0.1)
        body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", body, headers), timeout=5)
            assert err.value.code == 401
        ok = urllib.request.Request(url + "/v1/completions", body, {"Authorization": f"Bearer {API_KEY}",
                                                                    "Content-Type": "application/json"})
        with urllib.request.urlopen(ok, timeout=10) as resp:
            assert resp.status == 200
        # Default host: loopback only. Listening sockets of the server, from /proc/net/tcp.
        listen = [line.split()[1] for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
                  if line.split()[3] == "0A" and int(line.split()[1].split(":")[1], 16) == port]
        assert listen == [f"0100007F:{port:04X}"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)
    assert API_KEY not in log.read_text()


def test_secret_names():
    for name in ("HF_TOKEN", "api_key", "--api-key", "MM27_API_KEY", "apiKey", "DB_PASSWORD", "AWS_SECRET_ACCESS_KEY"):
        assert is_secret_name(name), name
    for name in ("output_tokens", "prompt_tokens", "tokenizer", "keyfile", "key", "author_time", "max_num_seqs"):
        assert not is_secret_name(name), name


def test_redact_masks_known_values_anywhere_and_secret_keys(monkeypatch, tmp_path):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "env-token-value-42")
    monkeypatch.setenv("SHORT_KEY", "1")        # too short to mask everywhere
    add_secret("cli-key-0987")
    assert {"env-token-value-42", "cli-key-0987"} <= set(known_secrets())
    data = {"errors": [{"message": "exited: python serve --api-key cli-key-0987 --port 1"}],
            "env": {"HF_TOKEN": "whatever", "N": "1"}, "note": "env-token-value-42",
            "output_tokens": 32, "key": {"profile": "p"}, "count": "1"}
    out = redact(data)
    assert out["errors"][0]["message"] == "exited: python serve --api-key *** --port 1"
    assert out["env"] == {"HF_TOKEN": REDACTED, "N": "1"}
    assert out["note"] == REDACTED and out["count"] == "1"
    assert out["output_tokens"] == 32 and out["key"] == {"profile": "p"}
    path = tmp_path / "r.json"
    write_json_atomic(path, data)
    assert "cli-key-0987" not in path.read_text() and "env-token-value-42" not in path.read_text()
