"""`bench layer` on CPU at small shapes of each attention kind: every part runs and reports its floor."""
from expertmesh.cli import main


def test_bench_layer_times_gqa_and_mla_layers_with_shared_experts(tmp_path):
    import json
    out = tmp_path / "rows.json"
    assert main(["bench", "layer", "--device", "cpu", "--shapes", "tiny,tiny_mla", "--tokens", "2", "--contexts", "32",
                 "--dtype", "float32", "--moe-backends", "reference", "--reps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["shape"], r["part"]) for r in rows] == [("tiny", "attention"), ("tiny", "experts"),
                                                       ("tiny-MLA", "attention"), ("tiny-MLA", "shared"),
                                                       ("tiny-MLA", "experts")]
    assert all(r["us"] > 0 and r["floor_us"] > 0 and r["bytes"] > 0 and r["flops"] > 0 for r in rows)
