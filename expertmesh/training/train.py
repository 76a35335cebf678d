"""Train the default model: plain-PyTorch Mixtral on the packed corpus, AdamW, cosine schedule, bf16 autocast.
Prints progress, logs the loss curve and per-domain validation loss to JSON, saves a Hugging Face checkpoint.

    python -m expertmesh.training.train --data data/corpus --out models/expertmesh-mini --minutes 8
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from expertmesh.training.checkpoint import save_checkpoint
from expertmesh.training.dataset import load_split, sample_batch
from expertmesh.training.evaluate import domain_losses, greedy_continue
from expertmesh.training.model import MixtralModel, MixtralShape
from expertmesh.training.tokenizer import BOS_TOKEN, EOS_TOKEN

SAMPLE_PROMPTS = {
    "python": "import os\ndef ",
    "c": "#include <stdio.h>\n",
    "shell": "#!/bin/sh\nset -e\n",
    "english": "The following options are",
    "french": "Cette commande permet de",
    "german": "Dieser Befehl",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/corpus", help="corpus folder with packed/ and tokenizer/")
    parser.add_argument("--out", default="models/expertmesh-mini")
    parser.add_argument("--log", default="runs/expertmesh-mini/training_log.json")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the training loop")
    parser.add_argument("--steps", type=int, default=None,
                        help="fixed number of steps (reproducible); default: as many as --minutes allows")
    parser.add_argument("--max-epochs", type=float, default=40.0, help="cap on passes over the train tokens")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--dropout", type=float, default=0.1, help="residual dropout, training only")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=96)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=1024)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16", help="autocast dtype")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--eval-windows", type=int, default=16, help="windows per domain in periodic evals")
    parser.add_argument("--final-eval-windows", type=int, default=None,
                        help="windows per domain in the final evaluation (default: the whole split)")
    parser.add_argument("--calibration-steps", type=int, default=40,
                        help="steps timed to turn --minutes into a step count")
    parser.add_argument("--sample-tokens", type=int, default=48)
    return parser.parse_args(argv)


def learning_rate(step: int, total_steps: int, peak: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay from peak to min_ratio * peak at total_steps."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(model: MixtralModel, weight_decay: float) -> list[dict]:
    # Norm gains are scales, not features: decaying them towards zero only fights the normalisation.
    decayed = [p for n, p in model.named_parameters() if not n.endswith("norm.weight")]
    plain = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> dict:
    started = time.time()
    deadline = started + args.minutes * 60
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    data = Path(args.data)
    packed, tokenizer_dir = data / "packed", data / "tokenizer"
    domains = json.loads((packed / "packed.json").read_text())["domains"]
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    train_tokens = torch.from_numpy(load_split(packed, "train")[0].astype(np.int32)).to(device)
    validation = load_split(packed, "validation")
    test = load_split(packed, "test")

    shape = MixtralShape(vocab_size=tokenizer.get_vocab_size(), hidden_size=args.hidden,
                         intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         num_local_experts=args.experts, num_experts_per_tok=args.top_k,
                         max_position_embeddings=args.max_positions,
                         bos_token_id=tokenizer.token_to_id(BOS_TOKEN), eos_token_id=tokenizer.token_to_id(EOS_TOKEN))
    if args.seq_len > shape.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds --max-positions {shape.max_position_embeddings}")
    model = MixtralModel(shape, dropout=args.dropout).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95),
                                  eps=1e-8, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch_size * args.seq_len
    max_steps = max(1, int(args.max_epochs * len(train_tokens) / tokens_per_step))
    total_steps = min(args.steps, max_steps) if args.steps else max_steps
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"train: {model.num_parameters() / 1e6:.2f}M parameters, {len(train_tokens) / 1e6:.2f}M train tokens, "
          f"{tokens_per_step} tokens/step, device {device_name}, budget {args.minutes} min", flush=True)

    log = {"settings": vars(args), "shape": shape.to_dict(), "parameters": model.num_parameters(),
           "device": device_name, "torch": torch.__version__, "domains": domains,
           "train_tokens": len(train_tokens), "curve": [], "validation_curve": []}
    best = {"loss": float("inf"), "step": -1, "state": None}

    def periodic_eval(step: int) -> None:
        result = domain_losses(model, *validation, domains, args.seq_len, args.batch_size, device,
                               autocast_dtype, max_windows=args.eval_windows)
        log["validation_curve"].append({"step": step, "loss": round(result["mean_loss"], 4)})
        if result["mean_loss"] < best["loss"]:
            best.update(loss=result["mean_loss"], step=step,
                        state={k: v.detach().clone() for k, v in model.state_dict().items()})
        print(f"step {step:6d}/{total_steps} val {result['mean_loss']:.4f} (best {best['loss']:.4f} "
              f"@ {best['step']}) {time.time() - started:6.0f} s", flush=True)

    model.train()
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    step, interval_steps, calibration_start = 0, 0, None
    while step < total_steps:
        if time.time() > deadline:
            print(f"train: time budget of {args.minutes} min reached at step {step}", flush=True)
            break
        lr = learning_rate(step, total_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs, targets = sample_batch(train_tokens, args.batch_size, args.seq_len, generator)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype != torch.float32):
            out = model(inputs)
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        (loss + args.aux_loss_coef * out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        aux_sum += out.aux_loss.detach()
        step += 1
        interval_steps += 1

        # Turn the time budget into a step count once steps run at speed, so the cosine ends on time.
        if args.steps is None and step == args.calibration_steps // 4:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            calibration_start = (step, time.time())
        if args.steps is None and step == args.calibration_steps and calibration_start:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = (time.time() - calibration_start[1]) / (step - calibration_start[0])
            eval_started = time.time()
            periodic_eval(step)
            # Each later step also carries its share of the periodic evaluations.
            step_cost_s = step_s + (time.time() - eval_started) / args.eval_every
            fit = step + int(0.97 * (deadline - time.time()) / step_cost_s)  # 3% margin for timing noise
            total_steps = max(step + 1, min(max_steps, fit))
            log["step_seconds"] = step_s
            print(f"train: {step_s * 1000:.1f} ms/step -> {total_steps} steps "
                  f"({total_steps * tokens_per_step / len(train_tokens):.1f} epochs)", flush=True)

        if step % args.log_every == 0 or step == total_steps:
            log["curve"].append({"step": step, "tokens": step * tokens_per_step,
                                 "loss": round((loss_sum / interval_steps).item(), 4),
                                 "aux_loss": round((aux_sum / interval_steps).item(), 4),
                                 "lr": round(lr, 7), "elapsed_s": round(time.time() - started, 1)})
            loss_sum.zero_()
            aux_sum.zero_()
            interval_steps = 0
        if step % args.eval_every == 0:
            periodic_eval(step)
    if not log["validation_curve"] or log["validation_curve"][-1]["step"] != step:
        periodic_eval(step)

    train_seconds = time.time() - started
    model.load_state_dict(best["state"])
    final_validation = domain_losses(model, *validation, domains, args.seq_len, args.batch_size, device,
                                     autocast_dtype, max_windows=args.final_eval_windows, with_expert_usage=True)
    final_test = domain_losses(model, *test, domains, args.seq_len, args.batch_size, device, autocast_dtype,
                               max_windows=args.final_eval_windows)
    samples = {}
    for domain, prompt in SAMPLE_PROMPTS.items():
        generated = greedy_continue(model, tokenizer.encode(prompt).ids, args.sample_tokens,
                                    shape.eos_token_id, device)
        samples[domain] = {"prompt": prompt, "completion": tokenizer.decode(generated)}
    log.update(steps=step, planned_steps=total_steps, tokens_seen=step * tokens_per_step,
               epochs_seen=round(step * tokens_per_step / len(train_tokens), 2),
               train_seconds=round(train_seconds, 1), best_step=best["step"], validation=final_validation,
               test=final_test, samples=samples)

    out = Path(args.out)
    weight_files = save_checkpoint(model, out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(json.dumps(log, indent=1, ensure_ascii=False) + "\n")
    shutil.copy(log_path, out / "training_log.json")

    print(f"train: {step} steps, {log['epochs_seen']} epochs in {train_seconds:.0f} s; best step {best['step']}")
    print(f"{'domain':8s} {'val loss':>8s} {'test loss':>9s}  mutual information domain/expert per layer (bits): "
          + " ".join(f"{v:.2f}" for v in final_validation["domain_expert_mutual_information_bits"]))
    for domain in domains:
        print(f"{domain:8s} {final_validation['loss'].get(domain, float('nan')):8.4f} "
              f"{final_test['loss'].get(domain, float('nan')):9.4f}")
    print(f"{'mean':8s} {final_validation['mean_loss']:8.4f} {final_test['mean_loss']:9.4f}")
    for domain, sample in samples.items():
        print(f"--- {domain}: {sample['prompt'] + sample['completion']!r}")
    print(f"train: wrote {', '.join(weight_files)} and config to {out}", flush=True)
    return log


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
