"""benchmarks/pyspy_summary.py: a node's serving samples apart from its start-up, and the device polling among them."""
from tests.benchmark_script import load_benchmark

pyspy_summary = load_benchmark("pyspy_summary")


MAIN = ("<module> (expertmesh/attention_node/__main__.py:120);run_node (expertmesh/process.py:62);"
        "AttentionNode.serve (expertmesh/attention_node/node.py:96);"
        "AttentionNode._engine (expertmesh/attention_node/node.py:221)")
FOLDED = "\n".join([
    "<module> (expertmesh/attention_node/__main__.py:120);run_node (expertmesh/process.py:62);"
    "main (expertmesh/attention_node/__main__.py:50);"
    "SegmentGraphs.capture (expertmesh/attention_node/cuda_graphs.py:120) 500",
    MAIN + ";AttentionNode._launch (expertmesh/attention_node/node.py:230) 30",
    MAIN + ";AttentionNode._settle_rows (expertmesh/attention_node/node.py:266);"
    "Launched.host_tokens (expertmesh/attention_node/node.py:52) 50",
    "Thread._bootstrap (threading.py:1002);Thread.run (threading.py:982);"
    "_SocketThread._run (expertmesh/transport/zmq.py:76);Socket.send (zmq/sugar/socket.py:700) 20",
    "something else entirely (x.py:1) 7"])


def test_serving_samples_are_counted_apart_from_start_up_with_the_device_polling_among_them(tmp_path):
    path = tmp_path / "attention_node_1.folded"
    path.write_text(FOLDED)
    text = pyspy_summary.summarize(path, top=10, steps=50, rate=100.0)
    head, *rows = text.splitlines()
    assert "100 serving samples (500 at start-up left out)" in head
    assert "polling the device 50.0%" in head
    shares = {row.split("  ")[-1]: row.split()[0] for row in rows}
    assert shares["AttentionNode._engine (node.py)"] == "80.0%"
    assert shares["Launched.host_tokens (node.py)"] == "50.0%"
    assert shares["Socket.send (socket.py)"] == "20.0%"
    assert not any(name.startswith(("<module>", "run_node")) for name in shares)  # wrappers of every stack
    # 50 samples at 100 Hz over 50 steps: 10 ms a step
    assert "10.000 ms/step  Launched.host_tokens" in text
