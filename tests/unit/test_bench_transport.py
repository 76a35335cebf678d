"""`expertmesh bench transport` on CPU with tiny sizes: real processes over zmq, ucx and raw ucxx give sane rows,
the NCCL code path and the lockstep M2N run on gloo (the lockstep M2N on UCX links too), and what cannot run is
refused with the offending value named."""
import dataclasses
import json
import sys

import pytest

from expertmesh import cli
from expertmesh.bench import baselines, harness, lockstep_m2n
from expertmesh.bench import transport as bench
from expertmesh.transport.base import TransportError

SIZES = [1024, 256 << 10]


def assert_sane(rows, pattern, backend, count):
    assert len(rows) == count
    for row in rows:
        assert (row.pattern, row.backend, row.device) == (pattern, backend, "cpu")
        assert 0 < row.latency_us < 1e6
        assert row.bandwidth_gb_per_s > 0
        assert row.iters >= harness.MIN_ITERS


@pytest.mark.parametrize("backend", ["zmq", "ucx"])
def test_point_to_point_between_two_processes(backend):
    rows = bench.point_to_point(backend, "cpu", SIZES, iters=5)
    assert_sane(rows, "p2p", backend, len(SIZES))
    assert [row.message_bytes for row in rows] == SIZES
    assert all(row.processes == "1x1" and row.tokens is None for row in rows)
    # a 256K message cannot cross faster than a 1K one, however noisy the host
    assert rows[1].bandwidth_gb_per_s > rows[0].bandwidth_gb_per_s


def test_raw_ucxx_baseline_beside_ucx(monkeypatch):
    """Wherever ucx runs, so does ucxx's own send/recv of preallocated buffers, unless left out; in both of
    ucx's progress modes."""
    monkeypatch.setattr(bench, "point_to_point", lambda *args: [])  # only the baseline's processes start
    monkeypatch.setattr(bench, "m2n", lambda *args: [])
    config = bench.BenchConfig(backends=["ucx"], sizes=[4096, 64 << 10], iters=5)
    rows, notes = bench.run(config)
    assert_sane(rows, "p2p", "ucxx-raw", 2)
    assert [row.message_bytes for row in rows] == [4096, 64 << 10]
    assert rows[1].bandwidth_gb_per_s > rows[0].bandwidth_gb_per_s
    table = bench.format_table(rows, notes).splitlines()
    assert [line.split()[:5] for line in table[1:3]] == [["p2p", "ucxx-raw", "cpu", "1x1", size]
                                                          for size in ("4K", "64K")]
    assert any(line.startswith("ucxx-raw: ") for line in table[3:])
    polling = baselines.raw_ucxx_point_to_point("cpu", [4096], iters=5, ucx_progress_mode="polling")
    assert_sane(polling, "p2p", "ucxx-raw", 1)
    assert bench.run(dataclasses.replace(config, raw_ucxx=False)) == ([], [])
    assert bench.run(dataclasses.replace(config, backends=["zmq"])) == ([], [])


def test_m2n_rounds_of_dispatch_and_combine():
    rows = bench.m2n("zmq", "cpu", senders=2, receivers=1, tokens=[1, 8], hidden=64, dtype="bfloat16", iters=5)
    assert_sane(rows, "m2n", "zmq", 2)
    assert [row.tokens for row in rows] == [1, 8]
    assert [row.message_bytes for row in rows] == [1 * 64 * 2, 8 * 64 * 2]
    assert all(row.processes == "2x1" for row in rows)


def test_lockstep_m2n_rows_over_gloo():
    """The lockstep M2N's serving classes (LockstepClient, LockstepRounds) over gloo: M2N rows only, no p2p."""
    config = bench.BenchConfig(backends=["lockstep"], senders=1, receivers=2, tokens=[1, 16], hidden=64, iters=5)
    rows, notes = bench.run(config)
    assert_sane(rows, "m2n", "lockstep-gloo", 2)
    assert [(row.processes, row.tokens, row.message_bytes) for row in rows] == [("1x2", 1, 1 * 64 * 2),
                                                                               ("1x2", 16, 16 * 64 * 2)]
    assert notes == []
    assert any(line.startswith("lockstep-* m2n: ") for line in bench.format_table(rows).splitlines())


@pytest.mark.parametrize("backend", ["lockstep-gloo", "lockstep-ucx"])
def test_named_lockstep_links_give_point_to_point_rows_too(backend):
    """lockstep-gloo, lockstep-ucx: one-way latency over the links themselves, and the M2N rounds; links that cannot
    join these processes on this device are refused before any process starts."""
    config = bench.BenchConfig(backends=[backend], sizes=[4096, 1 << 20], senders=1, receivers=1, tokens=[4],
                               hidden=64, iters=5)
    rows, notes = bench.run(config)
    assert_sane(rows[:2], "p2p", backend, 2)
    assert [row.message_bytes for row in rows[:2]] == [4096, 1 << 20]
    assert_sane(rows[2:], "m2n", backend, 1)
    with pytest.raises(harness.BenchError, match="lockstep-ipc: ipc links connect GPUs"):
        bench.check(bench.BenchConfig(backends=["lockstep-ipc"]))
    with pytest.raises(harness.BenchError, match="gloo links carry CPU tensors"):
        lockstep_m2n.check_links("lockstep-gloo", "cuda", 2)


def test_collective_path_on_gloo():
    """The NCCL code (send/recv ping-pong and stream, all_to_all_single with M2N splits) run on gloo."""
    rows = baselines.collective_point_to_point([4096], iters=5, dist_backend="gloo")
    rows += baselines.collective_m2n(1, 2, [2], hidden=32, dtype="float32", iters=5, dist_backend="gloo")
    assert_sane(rows[:1], "p2p", "gloo", 1)
    assert_sane(rows[1:], "m2n", "gloo", 1)
    assert (rows[1].processes, rows[1].tokens, rows[1].message_bytes) == ("1x2", 2, 2 * 32 * 4)


def test_merging_sender_timings():
    timings = [harness.SenderTiming(sender, 4, 100, [0.001, 0.003, 0.002], elapsed_s=0.5 + sender, bytes_moved=10**9)
               for sender in range(2)]
    [row] = harness.m2n_rows("zmq", "cpu", 2, 3, timings)
    assert row.latency_us == pytest.approx(2000)  # median over every sender's rounds
    assert row.bandwidth_gb_per_s == pytest.approx(2 / 1.5)  # all bytes over the slowest sender's time
    assert (row.processes, row.iters) == ("2x3", 3)


def test_a_failing_process_is_named():
    with pytest.raises(harness.BenchError, match="m2n_sender on cpu: ValueError"):
        bench.m2n("zmq", "cpu", 1, 1, [1], hidden=-1, dtype="bfloat16", iters=5)  # no tensor has -1 columns


def test_sizes_iterations_and_table():
    assert harness.parse_sizes("4K,64k,1M,256M,3") == [4096, 65536, 1 << 20, 256 << 20, 3]
    assert [harness.format_size(n) for n in (4096, 1 << 20, 256 << 20, 1000)] == ["4K", "1M", "256M", "1000"]
    assert harness.iters_for(100, 4096) == 100 and harness.iters_for(100, 64 << 20) == harness.MIN_ITERS
    assert harness.iters_for(100, 16 << 20) == 16 and harness.iters_for(2, 64 << 20) == 2
    row = harness.Row("p2p", "zmq", "cpu", "1x1", 4096, None, 100, 12.34, 0.5)
    table = bench.format_table([row, harness.Row("m2n", "ucx", "cpu", "2x2", 8192, 1, 50, 99.9, 1.25)], ["a note"])
    assert table.splitlines()[0].split() == ["pattern", "backend", "device", "procs", "size", "tokens", "iters",
                                             "latency_us", "GB/s"]
    assert table.splitlines()[1].split() == ["p2p", "zmq", "cpu", "1x1", "4K", "-", "100", "12.3", "0.500"]
    assert "a note" in table


@pytest.mark.parametrize("text", ["4X", "0", "-1K", ""])
def test_bad_size_is_named(text):
    with pytest.raises(ValueError, match="message size"):
        harness.parse_size(text)


def test_refusals_name_the_value(monkeypatch, capsys):
    with pytest.raises(harness.BenchError, match="'tcp'"):
        bench.check(bench.BenchConfig(backends=["tcp"]))
    with pytest.raises(harness.BenchError, match="--device cuda"):
        bench.check(bench.BenchConfig(nccl=True))
    monkeypatch.setattr(bench, "gpu_count", lambda: 1)
    with pytest.raises(harness.BenchError, match="needs 2 GPUs.*has 1"):
        bench.check(bench.BenchConfig(backends=["ucx"], device="cuda", nccl=True))
    monkeypatch.setattr(bench, "gpu_count", lambda: 2)
    with pytest.raises(harness.BenchError, match="'zmq' carries CPU tensors only"):
        bench.check(bench.BenchConfig(backends=["zmq"], device="cuda"))
    notes = bench.check(bench.BenchConfig(backends=["ucx"], device="cuda", nccl=True, senders=2, receivers=2))
    assert notes == ["nccl m2n left out: 2x2 needs 4 GPUs (one rank each), this host has 2"]
    assert bench.check(bench.BenchConfig(backends=["lockstep"], device="cuda", senders=1, receivers=2)) == []
    assert "CUDA IPC links" in capsys.readouterr().err  # 3 processes on 2 GPUs: ipc, not NCCL
    monkeypatch.setattr(bench, "gpu_count", lambda: 4)
    assert bench.check(bench.BenchConfig(backends=["lockstep"], device="cuda", senders=2, receivers=2)) == []
    assert "CUDA IPC" not in capsys.readouterr().err


def test_missing_ucxx_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "ucxx", None)  # import ucxx now raises ImportError
    with pytest.raises(TransportError, match="ucxx"):
        bench.check(bench.BenchConfig(backends=["ucx"]))


def test_cli_errors_and_json(tmp_path, capsys, monkeypatch):
    assert cli.main(["bench", "transport", "--backends", "zmq,nope"]) == 1
    assert "'nope'" in capsys.readouterr().err
    assert cli.main(["bench", "transport", "--m2n", "2by2"]) == 1
    assert "'2by2'" in capsys.readouterr().err
    row = harness.Row("p2p", "zmq", "cpu", "1x1", 4096, None, 5, 10.0, 0.1)
    monkeypatch.setattr(bench, "run", lambda config: ([row], []))
    out = tmp_path / "rows.json"
    assert cli.main(["bench", "transport", "--sizes", "4K", "--json", str(out)]) == 0
    assert "p2p" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["rows"] == [dict(pattern="p2p", backend="zmq", device="cpu", processes="1x1", message_bytes=4096,
                                   tokens=None, iters=5, latency_us=10.0, bandwidth_gb_per_s=0.1)]
    assert report["config"]["sizes"] == [4096] and report["config"]["backends"] == ["zmq", "ucx"]
    assert report["config"]["raw_ucxx"] is True
    assert cli.main(["bench", "transport", "--no-raw-ucxx", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["raw_ucxx"] is False


@pytest.mark.gpu
def test_cuda_rows_beside_nccl():
    """ucx and raw ucxx between CUDA tensors on two GPUs, and NCCL's send/recv and all_to_all_single on the same
    ones."""
    if bench.gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    config = bench.BenchConfig(backends=["ucx"], device="cuda", sizes=[4096, 1 << 20], iters=5, senders=1,
                               receivers=1, tokens=[1, 16], hidden=256, nccl=True)
    rows, notes = bench.run(config)
    assert notes == []
    assert [(row.pattern, row.backend) for row in rows] == [("p2p", "ucx")] * 2 + [("p2p", "ucxx-raw")] * 2 + \
        [("p2p", "nccl")] * 2 + [("m2n", "ucx")] * 2 + [("m2n", "nccl")] * 2
    for row in rows:
        assert row.device == "cuda" and row.latency_us > 0 and row.bandwidth_gb_per_s > 0


@pytest.mark.gpu
def test_named_links_on_cuda():
    """lockstep-ipc (on one GPU or across two) and, with two GPUs, lockstep-nccl: p2p and M2N rows each."""
    if bench.gpu_count() < 1:
        pytest.skip("needs a GPU")
    backends = ["lockstep-ipc"] + (["lockstep-nccl"] if bench.gpu_count() >= 2 else [])
    config = bench.BenchConfig(backends=backends, device="cuda", sizes=[4096, 1 << 20], iters=10, senders=1,
                               receivers=1, tokens=[1, 16], hidden=256)
    rows, notes = bench.run(config)
    assert [(row.pattern, row.backend) for row in rows] == \
        [("p2p", b) for b in backends for _ in range(2)] + [("m2n", b) for b in backends for _ in range(2)]
    for row in rows:
        assert row.device == "cuda" and row.latency_us > 0 and row.bandwidth_gb_per_s > 0


@pytest.mark.gpu
def test_lockstep_rows_on_cuda():
    """The lockstep M2N on CUDA: over NCCL with a GPU per rank, beside NCCL's all_to_all_single on the same GPUs;
    on one GPU over CUDA IPC."""
    if bench.gpu_count() < 1:
        pytest.skip("needs a GPU")
    two = bench.gpu_count() >= 2
    config = bench.BenchConfig(backends=["lockstep"], device="cuda", sizes=[4096], iters=20, senders=1, receivers=1,
                               tokens=[1, 16], hidden=256, nccl=two)
    rows, notes = bench.run(config)
    assert notes == []
    links = "lockstep-nccl" if two else "lockstep-ipc"  # auto
    expected = [("m2n", links)] * 2
    if two:
        expected = [("p2p", "nccl"), *expected, ("m2n", "nccl"), ("m2n", "nccl")]
    assert [(row.pattern, row.backend) for row in rows] == expected
    for row in rows:
        assert row.device == "cuda" and row.latency_us > 0 and row.bandwidth_gb_per_s > 0