"""The bf16 teacher-forcing case of tests/gpu/test_decode_step_gpu.py on CPU, reference ops: how far rounding order
alone moves the shipped model's next-token argmaxes. The MoE's weighted sum over k rounded after every add
(transformers' order) against summed in float32 and rounded once (the reference's order, and the kernels'), each
against float32.

    python benchmarks/bf16_agreement_cpu.py
"""
import asyncio
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import expertmesh.ops.fused_moe as moe_ops  # noqa: E402
from tests.inproc_cluster import teacher_forced_argmaxes, teacher_forcing_case  # noqa: E402

MODEL = ROOT / "models" / "expertmesh-mini"


def rounded_per_add(x, expert_ids, expert_weights, experts):
    """transformers' order: each weighted expert output added to the sum in x.dtype, rounded after every add."""
    out = torch.zeros_like(x)
    rows_of_pairs = moe_ops._local_rows(expert_ids, experts.local_index)
    for row in range(len(experts.expert_ids)):
        tokens, picks = torch.nonzero(rows_of_pairs == row, as_tuple=True)
        if tokens.numel() == 0:
            continue
        gate, up = (x[tokens] @ experts.gate_up[row].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ experts.down[row].T
        out.index_add_(0, tokens, y * expert_weights[tokens, picks].unsqueeze(-1).to(y.dtype))
    return out


def main() -> None:
    prompts, forced = teacher_forcing_case(MODEL)

    def argmaxes(dtype):
        return asyncio.run(teacher_forced_argmaxes(MODEL, prompts, forced, "cpu", dtype))

    float32, summed = argmaxes(torch.float32), argmaxes(torch.bfloat16)
    reference, moe_ops.fused_moe_reference = moe_ops.fused_moe_reference, rounded_per_add
    try:
        per_add = argmaxes(torch.bfloat16)
    finally:
        moe_ops.fused_moe_reference = reference

    def agree(a, b):
        return (a == b).float().mean().item()
    print(f"bf16 against float32: {agree(per_add, float32):.4f} rounded per add, {agree(summed, float32):.4f} summed "
          f"in float32; the two bf16 orders agree on {agree(per_add, summed):.4f}")


if __name__ == "__main__":
    main()
