"""Where a disaggregated step's device time goes, from the GPU rows of a served trace (`bench serve --trace`,
`microbatch_sweep.py --trace`, gpu_lockstep.sh TRACE=1): each captured span's last replay on the attention and the
expert GPU (telemetry.GpuMeter.timeline), on one host clock.

A whole-step replay of the attention node is the run of its spans from one "segment 0" of microbatch 0 to the next.
For each, beside the expert node's spans that fall within it:
  - the step's length, and each GPU's busy share of it;
  - a layer's length (middle layers), beside what the spans and crossings allow (the planner's layer_us);
  - per MoE layer, the attention GPU's wait: from the end of the last microbatch's segment j to the start of
    microbatch 0's segment j + 1 (what ping-pong should hide);
  - per round, the crossings: attention segment end -> expert compute start (dispatch), expert compute end ->
    the attention segment that uses it (combine), matched in order (microbatch by microbatch, layer by layer).
Medians over the replays. The two processes' clocks agree to within a few microseconds (GpuMeter.timeline).

    python benchmarks/gpu_timeline.py serve.trace.json       (or a .json.gz)
"""
import argparse
import gzip
import json
import statistics
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Span:
    label: str
    start: float  # µs, host clock
    duration: float
    row: int  # microbatch (attention) or lane (expert)

    @property
    def end(self) -> float:
        return self.start + self.duration


def gpu_rows(trace: dict) -> dict[str, list[Span]]:
    """The spans of each "<node> GPU" row, in start order, by node."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    rows: dict[str, list[Span]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X" and names[e["pid"]].endswith(" GPU"):
            rows.setdefault(names[e["pid"]].removesuffix(" GPU"), []).append(Span(e["name"], e["ts"], e["dur"],
                                                                                   e["tid"]))
    return {node: sorted(spans, key=lambda s: s.start) for node, spans in rows.items()}


def segment_of(span: Span) -> int:
    """j of a "segment j" or "segment j, <kind> <tokens>" label (the shape names the graph replayed)."""
    return int(span.label.split()[1].rstrip(","))


def shape_of(step: list[Span]) -> str:
    """A replay's graph: its microbatches' shapes, e.g. "decode 128 + decode 128" ("" for labels without one)."""
    return " + ".join(s.label.partition(", ")[2] for s in sorted(step, key=lambda s: s.row) if segment_of(s) == 0)


def replays(spans: list[Span]) -> list[list[Span]]:
    """An attention node's spans cut into whole-step replays: each starts at microbatch 0's first segment."""
    steps: list[list[Span]] = []
    for span in spans:
        if (segment_of(span), span.row) == (0, 0) or not steps:
            steps.append([])
        steps[-1].append(span)
    return steps


def largest_decode(shapes: set[str]) -> str | None:
    """The decode shape of the most tokens (the full batch's graph, whose replays the served steps mostly are)."""
    decode = [s for s in shapes if s and all(part.startswith("decode ") for part in s.split(" + "))]
    return max(decode, key=lambda s: sum(int(part.split()[1]) for part in s.split(" + ")), default=None)


def step_report(step: list[Span], experts: list[Span]) -> dict:
    """One replay: its length, both GPUs' busy shares, the attention GPU's wait per layer, the crossings."""
    start, end = step[0].start, max(s.end for s in step)
    inside = [e for e in experts if start <= e.start and e.end <= end + 1.0]
    microbatches = 1 + max(s.row for s in step)
    segments = {(segment_of(s), s.row): s for s in step}
    layers = max(j for j, _ in segments)  # MoE layers: segments 0..layers
    waits = [segments[(j + 1, 0)].start - segments[(j, microbatches - 1)].end
             for j in range(layers) if (j + 1, 0) in segments and (j, microbatches - 1) in segments]
    cycles = [segments[(j + 1, 0)].start - segments[(j, 0)].start for j in range(1, layers) if (j + 1, 0) in segments]
    # rounds in the attention node's order (layer by layer, microbatch by microbatch), the expert's in its own
    rounds = [(segments[(j, mb)], segments.get((j + 1, mb))) for j in range(layers) for mb in range(microbatches)
              if (j, mb) in segments]
    dispatch, combine = [], []
    for (sent, used), computed in zip(rounds, inside):
        dispatch.append(computed.start - sent.end)
        if used is not None:
            combine.append(used.start - computed.end)
    return {"step_us": end - start, "attention_busy": sum(s.duration for s in step) / (end - start),
            "expert_busy": sum(e.duration for e in inside) / (end - start), "rounds_matched": len(inside),
            "rounds": len(rounds), "microbatches": microbatches, "layer_cycle_us": cycles,
            "layer_wait_us": waits, "dispatch_us": dispatch, "combine_us": combine,
            "attention_span_us": [s.duration for s in step], "expert_span_us": [e.duration for e in inside]}


def pooled(steps: list[dict], key: str) -> list[float]:
    """The values under `key` of every step's report, in one list."""
    return [x for s in steps for x in s[key]]


def launch_intervals(trace: dict, node: str, parts: int = 10) -> list[float]:
    """The median interval (µs) between the node's step launches (host "attention" phases) in each tenth of its
    steps: the served step time as it went, where the GPU rows hold one replay per graph. With every request
    started at once, the first tenths are prefill steps and the middle ones the decode steps at full batch."""
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    starts = sorted(e["ts"] for e in trace["traceEvents"]
                    if e["ph"] == "X" and names[e["pid"]] == node and e["name"] == "attention")
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    return [statistics.median(gaps[len(gaps) * i // parts:len(gaps) * (i + 1) // parts]) for i in range(parts)
            if len(gaps) >= parts]


def outside_graph_us(trace: dict, node: str = "attention node 0") -> float | None:
    """A served decode step's time outside its graph: the median launch interval of the run's middle tenths (4th to
    8th: with every request started at once, decode steps at full batch) less the largest decode graph's replay."""
    shaped = [(shape_of(step), step) for step in replays(gpu_rows(trace).get(node, [])) if len(step) > 1]
    largest = largest_decode({shape for shape, _ in shaped})
    intervals = launch_intervals(trace, node)
    if largest is None or not intervals:
        return None
    step = next(s for shape, s in shaped if shape == largest)
    return statistics.median(intervals[3:8]) - (max(s.end for s in step) - step[0].start)


def mixed_attention_extra_us(trace: dict, node: str = "attention node 0") -> float | None:
    """What a graphed step carrying prompts adds to each layer's attention segment: the median segment of the
    one-microbatch graphs above the full decode batch's tokens, up to twice them (its decodes and a few prompt
    chunks), less the full decode batch's median segment. Each graph's last replay; the last segment (final norm,
    lm_head) left out."""
    by_shape = {shape_of(step): step for step in replays(gpu_rows(trace).get(node, [])) if len(step) > 1}
    decode = largest_decode(set(by_shape))
    if decode is None or " + " in decode:
        return None
    tokens = int(decode.split()[1])

    def segment_us(step: list[Span]) -> float:
        last = max(segment_of(s) for s in step)
        return statistics.median(s.duration for s in step if segment_of(s) < last)

    mixed = [segment_us(step) for shape, step in by_shape.items()
             if shape.startswith("prefill ") and " + " not in shape and tokens < int(shape.split()[1]) <= 2 * tokens]
    return statistics.median(mixed) - segment_us(by_shape[decode]) if mixed else None


def report(trace: dict) -> list[str]:
    rows = gpu_rows(trace)
    experts = [s for n, spans in rows.items() if n.startswith("expert node") for s in spans]
    lines = []
    for node in sorted(n for n in rows if n.startswith("attention node")):
        shaped = [(shape_of(step), step_report(step, experts)) for step in replays(rows[node]) if len(step) > 1]
        if not shaped:
            continue
        med = statistics.median
        lines.append(f"{node}: {len(shaped)} whole-step replays (each graph's last)")
        intervals = launch_intervals(trace, node)
        if intervals:
            lines.append("  step launches, median interval in each tenth of the run (ms): "
                         + " ".join(f"{us / 1e3:.2f}" for us in intervals))
        largest = largest_decode({shape for shape, _ in shaped})
        if largest is not None:  # the small graphs' replays would swamp the medians: the full batch's alone
            lines.append("  step us by graph: " + ", ".join(f"{shape} {s['step_us']:.0f}" for shape, s in shaped))
            outside = outside_graph_us(trace, node)
            mixed = mixed_attention_extra_us(trace, node)
            if outside is not None:
                lines.append(f"  a served decode step outside its graph: {outside:.0f} us (the middle tenths' "
                             f"launch interval less the largest decode graph's replay"
                             + ("; steps with prompts among them count too" if mixed is not None else "") + ")")
            if mixed is not None:
                lines.append(f"  a graphed step with prompts: {mixed:+.0f} us a layer in its attention segments "
                             f"over the largest decode graph's")
            lines.append(f"  below: the largest decode graph ({largest})")
        steps = [s for shape, s in shaped if largest is None or shape == largest]
        flat = lambda key: pooled(steps, key)  # noqa: E731
        lines.append(f"  step {med(s['step_us'] for s in steps):.0f} us; busy attention GPU "
                     f"{med(s['attention_busy'] for s in steps):.0%}, "
                     f"expert GPU {med(s['expert_busy'] for s in steps):.0%}")
        lines.append(f"  spans: attention {med(flat('attention_span_us')):.1f} us, experts "
                     f"{med(flat('expert_span_us')) if flat('expert_span_us') else float('nan'):.1f} us (medians)")
        m = max(s["microbatches"] for s in steps)
        full = [s for s in steps if s["microbatches"] == m]  # a step of few sequences has fewer microbatches
        of = lambda key: pooled(full, key)  # noqa: E731
        if all(of(key) for key in ("layer_cycle_us", "expert_span_us", "dispatch_us", "combine_us")):
            # what the planner's layer_us makes of these spans: the busier GPU's m spans, or one round trip
            t_a, t_e = med(of("attention_span_us")), med(of("expert_span_us"))
            trip = t_a + t_e + med(of("dispatch_us")) + med(of("combine_us"))
            lines.append(f"  a layer at m = {m} (microbatch 0's segment to its next): {med(of('layer_cycle_us')):.1f} "
                         f"us; the spans and crossings allow {max(m * t_a, m * t_e, trip):.1f} us (the longest of "
                         f"m·T_a, m·T_e and one round trip)")
        for key, what in (("layer_wait_us", "attention GPU waits per layer for the experts"),
                          ("dispatch_us", "attention segment end -> expert compute start"),
                          ("combine_us", "expert compute end -> the attention segment that uses it")):
            values = flat(key)
            if values:
                lines.append(f"  {what}: median {med(values):.1f} us, max {max(values):.1f} us ({len(values)})")
    return lines or ["no whole-step GPU spans in the trace (GPU rows come from whole-step graphs: ipc links)"]


def read_trace(path: Path) -> dict:
    """A trace's JSON, gzipped (.gz) or not."""
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", type=Path)
    args = parser.parse_args()
    print("\n".join(report(read_trace(args.trace))))


if __name__ == "__main__":
    main()
