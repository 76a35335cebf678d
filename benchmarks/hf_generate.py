"""The baseline a user has without us: Hugging Face transformers' plain `generate` on the same GPU and the same
random checkpoint (batch of equal-length random prompts, greedy, fixed new tokens). Prints decode tokens/s.

    python benchmarks/hf_generate.py --model /tmp/qwen3-shape --batch 64 --prompt-len 96 --new-tokens 96
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=96)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--json")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    mask = torch.ones_like(prompts)

    def run(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompts, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    run(4)  # warm-up
    prefill_s = run(1)
    total_s = run(args.new_tokens)
    decode_tok_s = args.batch * (args.new_tokens - 1) / (total_s - prefill_s)
    row = {"model": args.model, "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
           "total_s": total_s, "output_tok_s": args.batch * args.new_tokens / total_s, "decode_tok_s": decode_tok_s,
           "tpot_ms": (total_s - prefill_s) / (args.new_tokens - 1) * 1e3}
    print(f"transformers generate: {row['output_tok_s']:.0f} tok/s end to end, decode {decode_tok_s:.0f} tok/s, "
          f"TPOT {row['tpot_ms']:.1f} ms (batch {args.batch})", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(row, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
