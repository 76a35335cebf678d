"""`expertmesh plan`: every deployment of the GPUs on offer (GPU type per role, node counts, microbatches, batch per
attention node) through the performance model; the best under the TPOT objective, by throughput per cost and per GPU."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ..config import Config
from ..kv.cache import CUDA_ACTIVATION_MARGIN
from ..model.spec import ModelSpec
from .calibration import Calibration
from .gpus import GpuType
from .perf import GATEWAY_BUSY, Deployment, ModelCosts, Prediction, predict

MICROBATCHES = (1, 2, 3, 4)
NODE_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)


class NoFeasiblePlan(ValueError):
    """Nothing on offer meets the inputs; the message says what is short and by how much."""


@dataclass(frozen=True)
class Objective:
    tpot_p99_ms: float
    prompt_len: int
    output_len: int

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.output_len


@dataclass
class Plan:
    deployment: Deployment
    prediction: Prediction
    why: str = ""

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.prediction.tokens_per_s / self.deployment.gpus

    @property
    def tokens_per_s_per_dollar_hour(self) -> float | None:
        cost = self.deployment.cost_per_hour
        return self.prediction.tokens_per_s / cost if cost else None


def _batches(limit: int) -> list[int]:
    sizes = [b for b in (2 ** i for i in range(0, 13)) if b <= limit]
    return sizes + ([limit] if limit not in sizes and limit >= 1 else [])


def max_batch(costs: ModelCosts, gpu: GpuType, objective: Objective, colocated: bool, utilization: float) -> int:
    """Sequences of full context whose KV cache fits beside an attention node's weights (and, colocated, experts)."""
    free = (utilization - CUDA_ACTIVATION_MARGIN) * gpu.hbm_bytes - costs.attention_side_bytes() - \
        (costs.experts_bytes(costs.spec.num_experts) if colocated else 0.0)
    return max(0, int(free // (objective.context_len * costs.kv_bytes_per_token())))


def shortfalls(spec: ModelSpec, gpus: list[GpuType], objective: Objective, utilization: float,
               dtype_bytes: int) -> list[str]:
    """Why nothing fits in memory, per GPU type and over the whole offer, with the amounts."""
    costs = ModelCosts(spec, dtype_bytes)
    gib = 2 ** 30
    usable = {gpu.name: (utilization - CUDA_ACTIVATION_MARGIN) * gpu.hbm_bytes for gpu in gpus}
    one_sequence = objective.context_len * costs.kv_bytes_per_token()
    attention_node = costs.attention_side_bytes() + one_sequence
    lines = [f"an attention node on {gpu.name} needs {attention_node / gib:.1f} GiB (attention-side weights "
             f"{costs.attention_side_bytes() / gib:.1f} GiB + one sequence of {objective.context_len} tokens "
             f"{one_sequence / gib:.2f} GiB) of {usable[gpu.name] / gib:.1f} GiB usable: short by "
             f"{(attention_node - usable[gpu.name]) / gib:.1f} GiB"
             for gpu in gpus if attention_node > usable[gpu.name]]
    experts = costs.experts_bytes(spec.num_experts)
    total = sum(usable[gpu.name] * gpu.count for gpu in gpus)
    short = experts + attention_node - total
    if short > 0:
        largest = max(gpus, key=lambda gpu: gpu.hbm_bytes)
        lines.append(f"the experts ({experts / gib:.1f} GiB) and one attention node ({attention_node / gib:.1f} GiB) "
                     f"need {(experts + attention_node) / gib:.1f} GiB; all {sum(g.count for g in gpus)} GPUs on "
                     f"offer hold {total / gib:.1f} GiB usable: short by {short / gib:.1f} GiB (e.g. "
                     f"{math.ceil(short / usable[largest.name])} more {largest.name})")
    return lines


def _why(plan: Plan, objective: Objective, batch_limit: int) -> str:
    p, d = plan.prediction, plan.deployment
    reasons = [f"TPOT p99 {p.tpot_p99_us / 1e3:.1f} ms <= {objective.tpot_p99_ms:g} ms"]
    if d.batch_per_attention_node >= batch_limit:
        reasons.append(f"batch capped by the KV cache's memory ({batch_limit} sequences of {d.context_len} tokens)")
    else:  # the search stops at the first batch past the objective
        reasons.append("batch capped by the TPOT objective (the next size misses it)")
    if d.colocated:
        reasons.append("colocated: no link time, experts and attention share each GPU")
    else:
        reasons.append(f"bound by {p.bound}")
        if d.microbatches > 1:
            t_f = max(p.attention_us, p.lanes * p.experts_us)  # an expert node serves each attention node apart
            reasons.append(f"m={d.microbatches}: m*T_f {d.microbatches * t_f:.0f} us "
                           f"{'>=' if p.pingpong_holds else '<'} T_a+T_e+2T_c "
                           f"{p.attention_us + p.experts_us + 2 * p.comm_us:.0f} us")
    return "; ".join(reasons)


def search(spec: ModelSpec, gpus: list[GpuType], objective: Objective, cal: Calibration, top: int = 5,
           gpus_per_host: int = 8, utilization: float = 0.9, dtype_bytes: int = 2,
           expert_load_imbalance: float = 1.0) -> list[Plan]:
    """The best `top` plans meeting the objective: by throughput per cost when every type has a price, else per GPU.
    Raises NoFeasiblePlan saying what is short when nothing fits or nothing meets the objective."""
    costs = ModelCosts(spec, dtype_bytes)
    plans: list[Plan] = []
    fits_somewhere = False
    fastest: Plan | None = None
    roles = [(a, None) for a in gpus] + list(itertools.product(gpus, gpus))
    for attention_gpu, expert_gpu in roles:
        colocated = expert_gpu is None
        batch_limit = max_batch(costs, attention_gpu, objective, colocated, utilization)
        if batch_limit < 1:
            continue
        if colocated:
            expert_counts = [0]
        else:
            per_gpu = (utilization - CUDA_ACTIVATION_MARGIN) * expert_gpu.hbm_bytes
            least = math.ceil(costs.experts_bytes(spec.num_experts) / per_gpu)
            expert_counts = sorted({n for n in NODE_COUNTS if least <= n <= spec.num_experts} |
                                   ({least} if least <= spec.num_experts else set()))
        for expert_nodes in expert_counts:
            if not colocated and costs.experts_bytes(math.ceil(spec.num_experts / expert_nodes)) > per_gpu:
                continue
            for attention_nodes in NODE_COUNTS:
                same = expert_gpu is not None and expert_gpu.name == attention_gpu.name
                if attention_nodes + (expert_nodes if same else 0) > attention_gpu.count or \
                        (expert_gpu is not None and not same and expert_nodes > expert_gpu.count):
                    continue
                fits_somewhere = True
                for m in MICROBATCHES if not colocated else (1,):
                    best_here = None
                    for batch in _batches(batch_limit):
                        if batch < m:
                            continue
                        deployment = Deployment(attention_gpu, expert_gpu, attention_nodes, expert_nodes, m, batch,
                                                objective.context_len, gpus_per_host, dtype_bytes=dtype_bytes,
                                                expert_load_imbalance=expert_load_imbalance,
                                                async_scheduling=True)  # the default of the GPUs it plans for
                        prediction = predict(spec, deployment, cal, objective.prompt_len, objective.output_len,
                                             utilization)
                        plan = Plan(deployment, prediction)
                        if fastest is None or prediction.tpot_p99_us < fastest.prediction.tpot_p99_us:
                            fastest = plan
                        if prediction.tpot_p99_us > objective.tpot_p99_ms * 1e3:
                            break  # larger batches only take longer
                        best_here = plan
                    if best_here is not None:
                        best_here.why = _why(best_here, objective, batch_limit)
                        plans.append(best_here)
    if not fits_somewhere:
        raise NoFeasiblePlan("nothing fits in memory:\n  " + "\n  ".join(
            shortfalls(spec, gpus, objective, utilization, dtype_bytes) or ["no GPU count on offer holds the model"]))
    if not plans:
        raise NoFeasiblePlan(
            f"no plan meets TPOT p99 <= {objective.tpot_p99_ms:g} ms; the fastest found takes "
            f"{fastest.prediction.tpot_p99_us / 1e3:.2f} ms ({describe(fastest)}): short by "
            f"{fastest.prediction.tpot_p99_us / 1e3 - objective.tpot_p99_ms:.2f} ms")
    priced = all(plan.tokens_per_s_per_dollar_hour is not None for plan in plans)
    def rank(plan: Plan) -> tuple[float, float]:  # ties (to 4 digits): the larger deployment first
        score = plan.tokens_per_s_per_dollar_hour if priced else plan.tokens_per_s_per_gpu
        return -float(f"{score:.4g}"), -plan.prediction.tokens_per_s
    plans.sort(key=rank)
    return plans[:top]


def describe(plan: Plan) -> str:
    d = plan.deployment
    nodes = f"{d.attention_nodes} x {d.attention_gpu.name} colocated (attention and every expert on each)" \
        if d.colocated else f"{d.attention_nodes} x {d.attention_gpu.name} attention + {d.expert_nodes} x " \
                            f"{d.expert_gpu.name} expert"
    return f"{nodes}, m={d.microbatches}, batch {d.batch_per_attention_node}/attention node"


def format_plans(plans: list[Plan]) -> str:
    gib = 2 ** 30
    priced = all(plan.tokens_per_s_per_dollar_hour is not None for plan in plans)
    lines = ["ranked by " + ("output tokens per dollar" if priced else
                             "output tokens/s per GPU (give --price NAME=USD for every type to rank per cost)")]
    for rank, plan in enumerate(plans, 1):
        d, p = plan.deployment, plan.prediction
        per_cost = plan.tokens_per_s_per_dollar_hour
        lines.append(f"#{rank} {describe(plan)}")
        lines.append(f"   {p.tokens_per_s:,.0f} tok/s, {plan.tokens_per_s_per_gpu:,.0f} per GPU"
                     + (f", {per_cost * 3600:,.0f} tokens per $ ({d.cost_per_hour:.2f} $/h)" if per_cost else "")
                     + f"; TPOT {p.step_us / 1e3:.2f} ms, p99 {p.tpot_p99_us / 1e3:.2f} ms")
        lines.append(f"   per layer: T_a {p.attention_us:.0f} us, T_e {p.experts_us:.0f} us, T_c {p.comm_us:.0f} us;"
                     f" step {p.step_us:.0f} us")
        mem = p.attention_memory
        lines.append(f"   attention GPU: weights {mem.weights / gib:.1f} + KV {mem.kv_cache / gib:.1f} + buffers "
                     f"{mem.buffers / gib:.1f} = {mem.total / gib:.1f} of {mem.capacity / gib:.1f} GiB")
        if p.expert_memory is not None:
            mem = p.expert_memory
            lines.append(f"   expert GPU: weights {mem.weights / gib:.1f} + buffers {mem.buffers / gib:.1f} = "
                         f"{mem.total / gib:.1f} of {mem.capacity / gib:.1f} GiB")
        if p.gateway_workers > 1:
            lines.append(f"   gateway: {p.gateway_workers} processes (at most {GATEWAY_BUSY:.0%} busy each)")
        lines.append(f"   why: {plan.why}")
    return "\n".join(lines)


def config_dict(config: Config) -> dict:
    """The config's values that differ from the defaults, by section: what a plan chose, readable at a glance."""
    defaults, chosen = Config().to_dict(), config.to_dict()
    changed = {section: {key: value for key, value in values.items() if defaults[section].get(key) != value}
               for section, values in chosen.items() if values != defaults[section]}
    changed.setdefault("model", {})
    return {**changed, "model": {"path": config.model.path, **changed["model"]}}  # the model, even the default one


def to_config(plan: Plan, model_path: str, gpus_per_host: int = 8, prompt_len: int = 0) -> Config:
    """The cluster config `expertmesh launch --config` runs for a plan."""
    d = plan.deployment
    config = Config()
    config.model.path, config.model.device, config.model.dtype = model_path, "cuda", "bfloat16"
    config.cluster.attention_nodes, config.cluster.expert_nodes = d.attention_nodes, d.expert_nodes
    config.cluster.attention_gpu_type = d.attention_gpu.name
    config.cluster.expert_gpu_type = None if d.colocated else d.expert_gpu.name
    config.engine.microbatches, config.engine.max_num_seqs = d.microbatches, d.batch_per_attention_node
    config.engine.max_model_len = d.context_len
    if d.gpus <= gpus_per_host:  # across hosts the Ray launcher runs one gateway process (format_plans says the need)
        config.gateway.workers = plan.prediction.gateway_workers
    # a step holds the whole decode batch and the prompts joining it
    config.engine.max_batch_tokens = max(config.engine.max_batch_tokens, d.batch_per_attention_node + prompt_len)
    if not d.colocated:
        config.transport.backend = "ipc" if d.gpus <= gpus_per_host else "nccl"
    return config.validate()
