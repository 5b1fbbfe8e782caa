"""Benchmark the benchmark client: is the load generator ever the bottleneck?

    python -m pytest_mm27.benchmarks.bench_client [--levels 64,256,512,1024] [--step-ms 10]

Starts the null SSE server (/work/shared/tools/null_sse_server.js, or
--server-js), which emits one token per step to every open stream, pinned to
CPU 1 with ``taskset`` when available, and drives it with:

- our client, workers=1, pinned to CPU 0;
- our client, workers=2, unpinned;
- with --with-aiohttp, both again on the aiohttp transport (the old path);
- ``vllm bench serve`` and GuideLLM when installed ("not installed" otherwise).

For each it reports output tok/s (whole run and steady window), the offered
rate (c tokens per true step), TPOT error against the nominal step and
against the true step, client-added TTFT, and client CPU.

Truth comes from a probe: a separate, mostly idle process that reads one
extra stream of the same server over a raw socket during the level and
computes (last chunk - first chunk) / (tokens - 1), which no client delay at
the ends can bias by more than a few microseconds per 200 tokens. When the
server is saturated its true step grows past the nominal; a client is judged
against the true step. Client-added TTFT is TTFT p50 minus half a step: a
request arriving at a random phase waits U(0, step) for its first token,
whose median is step/2. The Python twin reports its own TTFT p50 (request
parsed -> first token written) on GET /stats, and then that is subtracted
instead: closed-loop refills are phase-locked to the server's ticks, so the
step/2 estimate can be off by up to half a step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..catalog.workload import Workload
from ..host.ports import free_port
from ..loadgen import run_level

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SERVER_JS = Path("/work/shared/tools/null_sse_server.js")
VLLM_CANDIDATES = [REPO / ".venv-vllm" / "bin" / "vllm"]
GUIDELLM_CANDIDATES = [REPO / ".venv-guidellm" / "bin" / "guidellm"]

PROBE = r"""
import socket, sys, time, json
port, tokens, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
time.sleep(delay)
body = json.dumps({"model": "null", "prompt": [100], "max_tokens": tokens, "stream": True}).encode()
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\n\r\n" % len(body) + body)
times, buf = [], b""
while True:
    data = s.recv(65536)
    if not data:
        break
    now = time.monotonic()
    times.extend([now] * data.count(b'"text":"tok'))
    buf = (buf + data)[-64:]
    if b"[DONE]" in buf:
        break
print((times[-1] - times[0]) / (len(times) - 1) * 1000 if len(times) > 1 else "nan")
"""


def cpu_ticks(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > cpu else []


class NullServer:
    def __init__(self, js: Path | None, step_ms: float):
        self.port = free_port()
        self.step_ms = step_ms
        if js is not None:
            cmd = [*taskset(1), "node", str(js), str(self.port), str(step_ms)]
        else:  # the Python twin, for hosts without Node
            cmd = [*taskset(1), sys.executable, "-m", "pytest_mm27.benchmarks.null_server", str(self.port), str(step_ms)]
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=REPO)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("null server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def server_ttft_p50(self) -> float | None:
        """Server-side TTFT p50 since the last call (Python twin only; Node has no /stats)."""
        import json
        import urllib.request
        try:
            with urllib.request.urlopen(self.url + "/stats", timeout=5) as r:
                data = json.loads(r.read())
            return data.get("ttft_p50_ms") if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def start_probe(port: int, tokens: int, delay_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PROBE, str(port), str(tokens), str(delay_s)],
                            stdout=subprocess.PIPE, text=True)


def probe_result(p: subprocess.Popen) -> float:
    try:
        out, _ = p.communicate(timeout=120)
        return float(out.strip())
    except (subprocess.TimeoutExpired, ValueError):
        p.kill()
        return float("nan")


@dataclasses.dataclass
class Row:
    client: str
    c: int
    tok_s: float = float("nan")
    steady: float | None = None
    true_step: float = float("nan")
    tpot: float = float("nan")
    ttft_p50: float = float("nan")
    cpu: str = ""
    server_cpu: float = float("nan")
    server_ttft: float | None = None
    failed: int = 0
    note: str = ""


def run_ours(server: NullServer, wl: Workload, c: int, workers: int, pin: bool, aiohttp: bool = False) -> Row:
    affinity = os.sched_getaffinity(0)
    saved = os.environ.get("MM27_LOADGEN_AIOHTTP")
    os.environ["MM27_LOADGEN_AIOHTTP"] = "1" if aiohttp else "0"
    if pin:
        os.sched_setaffinity(0, {0})
    probe = start_probe(server.port, wl.output_tokens, 0.5 + wl.output_tokens * server.step_ms / 1000)
    s0 = cpu_ticks(server.proc.pid)
    server.server_ttft_p50()  # reset
    t0 = time.monotonic()
    try:
        m = run_level([server.url], "null", wl, c, workers=workers)
    finally:
        os.sched_setaffinity(0, affinity)
        if saved is None:
            os.environ.pop("MM27_LOADGEN_AIOHTTP", None)
        else:
            os.environ["MM27_LOADGEN_AIOHTTP"] = saved
    wall = time.monotonic() - t0
    server_cpu = (cpu_ticks(server.proc.pid) - s0) / wall
    cpu = "/".join(f"{u:.0%}" for u in m.worker_cpu_util)
    chunks = m.itl_ms.n + m.ttft_ms.n
    note = f"cpu/chunk {m.client_cpu_s / chunks * 1e6:.1f} us; " if chunks else ""
    note += f"loop-lag p99 {m.loop_lag_ms.p99:.1f} ms"
    if m.client_bound:
        note += f"; CLIENT-BOUND: {m.client_bound_reason}"
    return Row(f"mm27{' aiohttp' if aiohttp else ''} w={workers}{' pinned' if pin else ''}", c, m.output_tok_s, m.steady_output_tok_s,
               probe_result(probe), m.tpot_ms.mean, m.ttft_ms.p50, cpu, server_cpu,
               server.server_ttft_p50(), m.failed, note)


def find(candidates: list[Path], name: str) -> str | None:
    env = os.environ.get(f"MM27_{name.upper()}")
    for path in [Path(env)] if env else []:
        if path.exists():
            return str(path)
    for path in candidates:
        if path.exists():
            return str(path)
    return shutil.which(name)


def _num(pattern: str, text: str) -> float:
    m = re.search(pattern + r"\s*([0-9.]+)", text)
    return float(m.group(1)) if m else float("nan")


def run_external(name: str, argv: list[str], server: NullServer, c: int, tokens: int, parse) -> Row:
    probe = start_probe(server.port, tokens, 3.0 + tokens * server.step_ms / 1000)
    s0 = cpu_ticks(server.proc.pid)
    server.server_ttft_p50()  # reset
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        out = done.stdout + "\n" + done.stderr
    except subprocess.TimeoutExpired:
        out = ""
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    row = Row(name, c, true_step=probe_result(probe),
              server_cpu=(cpu_ticks(server.proc.pid) - s0) / wall)
    cpu_s = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    row.cpu = f"{cpu_s:.1f}s total (incl. start-up)"
    parse(out, row)
    row.server_ttft = server.server_ttft_p50()
    if row.tok_s != row.tok_s:
        row.note = "no result; output tail: " + " | ".join(out.strip().splitlines()[-3:])[:200]
    return row


def parse_vllm(out: str, row: Row) -> None:
    row.tok_s = _num(r"Output token throughput \(tok/s\):", out)
    row.tpot = _num(r"Mean TPOT \(ms\):", out)
    row.ttft_p50 = _num(r"Median TTFT \(ms\):", out)
    row.failed = int(_num(r"Failed requests:", out)) if "Failed requests" in out else 0


def tiny_tokenizer(vllm_bin: str, tmp: Path) -> Path | None:
    """A tokenizer for vllm bench (it needs one); made with the vLLM venv's python."""
    python = Path(vllm_bin).with_name("python")
    out = tmp / "tiny"
    r = subprocess.run([str(python), "-m", "pytest_mm27.engines.tinymodel", str(out)], cwd=REPO,
                       capture_output=True, text=True)
    return out if r.returncode == 0 else None


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def print_table(rows: list[Row], step_ms: float, header: bool = True) -> None:
    if header:
        print(f"{'client':<26}{'c':>6}{'tok/s':>10}{'steady':>10}{'offered':>10}{'true step':>10}"
              f"{'TPOT':>9}{'err/nom':>9}{'err/true':>9}{'TTFT p50':>10}{'client+':>9}{'srv cpu':>8}"
              f"  {'client cpu':<14} notes")
    for r in rows:
        offered = r.c * 1000 / r.true_step if r.true_step == r.true_step else float("nan")
        err_nom = (r.tpot / step_ms - 1) * 100
        err_true = (r.tpot / r.true_step - 1) * 100
        # With the server's own TTFT (Python twin) subtract it; else its expectation, step/2.
        added = r.ttft_p50 - (r.server_ttft if r.server_ttft is not None else step_ms / 2)
        notes = r.note + (f"; {r.failed} failed" if r.failed else "")
        print(f"{r.client:<26}{r.c:>6}{fmt(r.tok_s, '.0f'):>10}{fmt(r.steady, '.0f'):>10}"
              f"{fmt(offered, '.0f'):>10}{fmt(r.true_step, '.3f'):>10}{fmt(r.tpot, '.3f'):>9}"
              f"{fmt(err_nom, '+.2f'):>8}%{fmt(err_true, '+.2f'):>8}%{fmt(r.ttft_p50, '.2f'):>10}"
              f"{fmt(added, '.2f'):>9}{fmt(r.server_cpu, '.0%'):>8}  {r.cpu:<14} {notes}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pytest_mm27.benchmarks.bench_client", description=__doc__.split("\n")[0])
    ap.add_argument("--levels", default="64,256,512,1024")
    ap.add_argument("--step-ms", type=float, default=10.0)
    ap.add_argument("--output-tokens", type=int, default=200)
    ap.add_argument("--requests-per-c", type=float, default=3.0)
    ap.add_argument("--server-js", type=Path, default=DEFAULT_SERVER_JS)
    ap.add_argument("--server", choices=("node", "python"), default=None,
                    help="null server: node (default when available) or the Python twin")
    ap.add_argument("--only-ours", action="store_true", help="skip vllm bench serve and GuideLLM")
    ap.add_argument("--with-aiohttp", action="store_true",
                    help="also run our client on its aiohttp transport (MM27_LOADGEN_AIOHTTP=1): the old path")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.server is None:
        args.server = "node" if shutil.which("node") and args.server_js.exists() else "python"
    js = args.server_js if args.server == "node" else None
    if js is not None and (not shutil.which("node") or not js.exists()):
        print(f"needs node and {js}", file=sys.stderr)
        return 2

    wl = Workload(name="bench", description="", source=Path("bench"), input_tokens=128,
                  output_tokens=args.output_tokens, ignore_eos=True,
                  requests_per_concurrency=args.requests_per_c, min_requests=1, duration_s=None,
                  warmup_requests=0, api="completions", temperature=0.0, request_timeout_s=300.0, seed=0)
    print(f"null server: {'node ' + js.name if js else 'python -m pytest_mm27.benchmarks.null_server'}, step {args.step_ms} ms, "
          f"{'pinned to CPU 1' if taskset(1) else 'not pinned'}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}; {args.output_tokens} output tokens, "
          f"{args.requests_per_c:g} x c requests")
    print("columns: tok/s = output tok/s over the run; steady = over the all-in-flight window; "
          "offered = c / true step; true step = probe's TPOT; err = TPOT error vs nominal / true step; "
          "client+ = client-added TTFT = TTFT p50 - server-side TTFT p50 (Python twin's /stats), "
          "or - step/2 with the Node server\n")

    rows: list[Row] = []
    server = NullServer(js, args.step_ms)
    try:
        for c in levels:
            variants = [(1, True, False), (2, False, False)]
            if args.with_aiohttp:
                variants += [(1, True, True), (2, False, True)]
            for workers, pin, old in variants:
                row = run_ours(server, wl, c, workers, pin, old)
                rows.append(row)
                print_table([row], args.step_ms, header=not rows[:-1])
        if not args.only_ours:
            rows += run_others(server, levels, args)
    finally:
        server.stop()
    print("\nall rows:")
    print_table(rows, args.step_ms)
    return 0


def run_others(server: NullServer, levels: list[int], args) -> list[Row]:
    rows: list[Row] = []
    vllm = find(VLLM_CANDIDATES, "vllm")
    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer(vllm, Path(tmp)) if vllm else None
        for c in levels:
            if not vllm:
                rows.append(Row("vllm bench serve", c, note="not installed"))
            elif tok is None:
                rows.append(Row("vllm bench serve", c, note="no tokenizer (tinymodel failed)"))
            else:
                argv = [vllm, "bench", "serve", "--backend", "vllm", "--base-url", server.url,
                        "--endpoint", "/v1/completions", "--model", "null", "--tokenizer", str(tok),
                        "--dataset-name", "random", "--random-input-len", "128",
                        "--random-output-len", str(args.output_tokens), "--ignore-eos",
                        "--num-prompts", str(int(args.requests_per_c * c)), "--max-concurrency", str(c),
                        "--request-rate", "inf", "--disable-tqdm"]
                rows.append(run_external("vllm bench serve", argv, server, c, args.output_tokens, parse_vllm))
            print_table(rows[-1:], args.step_ms, header=False)
        guidellm = find(GUIDELLM_CANDIDATES, "guidellm")
        for c in levels:
            if not guidellm:
                rows.append(Row("guidellm", c, note="not installed"))
            elif tok is None:
                rows.append(Row("guidellm", c, note="no tokenizer (tinymodel failed)"))
            else:
                # GuideLLM 0.8 CLI (kind=...,key=value options); its JSON output is parsed,
                # not the console tables.
                report = Path(tmp) / f"guidellm-c{c}.json"
                argv = [guidellm, "run", "--disable-console",
                        "--backend", f"kind=openai_http,target={server.url},model='null',"
                                     "request_format=/v1/completions",
                        "--profile", f"kind=concurrent,streams={c}",
                        "--constraint", f"kind=max_requests,count={int(args.requests_per_c * c)}",
                        "--data", f"kind=synthetic_text,prompt_tokens=128,output_tokens={args.output_tokens}",
                        "--tokenizer", f"kind=hf_auto,model={tok}",
                        "--output", f"kind=json,path={report}"]
                rows.append(run_external("guidellm", argv, server, c, args.output_tokens,
                                         lambda out, row, report=report: parse_guidellm(report, row)))
            print_table(rows[-1:], args.step_ms, header=False)
    return rows


def parse_guidellm(report: Path, row: Row) -> None:
    """Read GuideLLM's JSON report: its whole-run output tok/s, ITL and TTFT.

    GuideLLM's "TPOT" divides the whole request latency (TTFT included) by the
    output tokens; its ITL is (last - first token) / (tokens - 1), which is
    what vllm bench and we call TPOT, so ITL is the column compared.
    """
    import json
    try:
        metrics = json.loads(report.read_text())["benchmarks"][0]["metrics"]
    except (OSError, ValueError, KeyError, IndexError):
        return

    def stat(name: str, which: str, key: str) -> float:
        value = ((metrics.get(name) or {}).get(which) or {}).get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")

    row.tok_s = stat("output_tokens_per_second", "total", "mean")
    row.tpot = stat("inter_token_latency_ms", "successful", "mean")
    row.ttft_p50 = stat("time_to_first_token_ms", "successful", "median")
    row.failed = int((metrics.get("request_totals") or {}).get("errored") or 0)


if __name__ == "__main__":
    sys.exit(main())
