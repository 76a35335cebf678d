"""The bf16 teacher-forcing case of tests/gpu/test_decode_step_gpu.py on a GPU, at 64 prompts x 64 tokens and at
its first 16 prompts: next-token argmax agreement between the kernels, the reference ops (attention by SDPA as torch
picks its backend, and with SDPA's math backend forced), the reference ops with attention computed in float32 and
rounded once, and float32. Which reference the kernels' paged attention sits nearest to.

    python benchmarks/bf16_agreement_gpu.py
"""
import asyncio
import contextlib
import functools
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import expertmesh.model.layers as layers  # noqa: E402
from expertmesh.ops import attention as attention_ops  # noqa: E402
from tests.inproc_cluster import kernel_ops, teacher_forced_argmaxes, teacher_forcing_case  # noqa: E402

MODEL = ROOT / "models" / "expertmesh-mini"


def float32_attention(q, k_cache, v_cache, *args, backend: str = "auto"):
    """Paged attention computed in float32 (the reference's math on upcast inputs), rounded once to q.dtype."""
    return attention_ops.paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), *args).to(q.dtype)


@contextlib.contextmanager
def patched(pairs):
    """module.name = value for each (module, name, value), restored after."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in pairs]
    try:
        for module, name, value in pairs:
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def main() -> None:
    prompts, forced = teacher_forcing_case(MODEL, prompts=64)

    def argmaxes(dtype=torch.bfloat16):
        return asyncio.run(teacher_forced_argmaxes(MODEL, prompts, forced, "cuda", dtype))

    references = [(module, name, functools.partial(op, backend="reference")) for module, name, op in kernel_ops()]
    runs = {"kernels": argmaxes()}
    with patched([(layers, "paged_attention", float32_attention)]):
        runs["kernels, attention in float32"] = argmaxes()
    with patched(references):
        runs["reference"] = argmaxes()
        with sdpa_kernel(SDPBackend.MATH):
            runs["reference, SDPA math"] = argmaxes()
        with patched([(layers, "paged_attention", float32_attention)]):
            runs["reference, attention in float32"] = argmaxes()
    runs["float32"] = argmaxes(torch.float32)
    names = list(runs)
    for label, columns in (("64 prompts x 64 tokens", slice(None)), ("the first 16 prompts (the test's case "
                                                                      "before the sixteenth session)", slice(0, 16))):
        print(f"next-token argmax agreement, {label}:")
        print("| | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for a in names:
            print(f"| {a} | " + " | ".join(f"{(runs[a][:, columns] == runs[b][:, columns]).float().mean().item():.4f}"
                                           for b in names) + " |")


if __name__ == "__main__":
    main()
