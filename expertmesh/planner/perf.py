"""The performance model: a deployment's per-layer times (T_a attention, T_e experts, T_c one way of the M2N), the
ping-pong step, throughput, TPOT and memory per GPU, from rooflines corrected by a Calibration.

Per op: floor = max(bytes / (datasheet bandwidth x measured efficiency), flops / (datasheet peak x efficiency)), then
the calibration's line (a fixed launch/host cost, a slope on the floor, host time per sequence); a served calibration
(served.py) adds what disaggregated nodes pay beyond the benchmarks (their round, their parts' served time).
Messages are the simulator's (placement/simulator.py: CostModel.bytes_per_message, each token sent once to each
distinct expert node, contiguous placement; its synthetic router for group-limited routing); `simulate` on a real
trace gives the load imbalance (`plan --routing`)."""
from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass

from ..kv.cache import CUDA_ACTIVATION_MARGIN, entry_layout
from ..model.spec import ModelSpec
from ..placement.simulator import CostModel
from .calibration import Calibration
from .gpus import GpuType

ROUTING_BYTES_PER_CHOICE = 8  # an expert id (int32) and a routing weight (float32) travel with each token's choice


@dataclass(frozen=True)
class Deployment:
    """One plan: GPU type and count per role, microbatches, decode batch per attention node, context."""
    attention_gpu: GpuType
    expert_gpu: GpuType | None  # None: colocated (each attention node runs every expert)
    attention_nodes: int
    expert_nodes: int  # 0: colocated
    microbatches: int
    batch_per_attention_node: int  # sequences decoding at once on each attention node
    context_len: int  # tokens a sequence may hold (prompt + output): what its KV cache is sized for
    gpus_per_host: int = 8  # nodes beyond one host talk over the inter-host links
    # The busiest expert node's tokens over the mean (`simulate`'s expert_load_max_over_mean on a routing trace);
    # 1: uniform routing. The layer waits for that node.
    expert_load_imbalance: float = 1.0
    # Devices every node shares (our one-GPU runs: 1; CPU runs: the host's cores); 0: each node has its own GPU
    shared_devices: int = 0
    dtype_bytes: int = 2
    # `--async-scheduling`: the host prepares step N+1 while the device runs step N, so a step lasts the longer of
    # the two, not their sum
    async_scheduling: bool = False

    @property
    def colocated(self) -> bool:
        return self.expert_nodes == 0

    @property
    def gpus(self) -> int:
        return self.attention_nodes + self.expert_nodes

    @property
    def cost_per_hour(self) -> float | None:
        prices = [self.attention_gpu.price_per_hour] + ([] if self.colocated else [self.expert_gpu.price_per_hour])
        if any(price is None for price in prices):
            return None
        return self.attention_nodes * prices[0] + (self.expert_nodes * prices[1] if not self.colocated else 0.0)


@dataclass
class Memory:
    """Bytes on one GPU of a role."""
    weights: float
    kv_cache: float
    buffers: float  # activations and receive slots: the margin kv/cache.py keeps
    capacity: float  # gpu_memory_utilization x the GPU's memory

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.buffers

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity


@dataclass
class Prediction:
    attention_us: float  # T_a: one MoE layer's attention part for one microbatch (+ the served M2N's host work)
    experts_us: float  # T_e: one MoE layer's experts for one attention node's microbatch, the busiest expert node
    # (+ its host work)
    comm_us: float  # T_c: one way of the M2N for one microbatch (0 colocated)
    layer_us: float  # one MoE layer, all microbatches, ping-pong overlapped
    step_us: float  # one decode step (= TPOT at steady state)
    prefill_us: float  # one prompt's cost in a step: its tokens inside the step's graph, or an eager microbatch
    tokens_per_s: float  # output tokens per second, whole cluster, steady state with the workload's prefills
    tpot_p99_us: float  # the p99 step: with the prompts a step carries when 1% or more of steps carry any
    pingpong_holds: bool  # MegaScale-Infer's m·T_f >= T_a + T_e + 2·T_c: the pipeline hides T_c
    attention_memory: Memory
    expert_memory: Memory | None
    lanes: int = 1  # attention nodes each expert node serves apart: its busy time per microbatch is lanes x T_e
    gateway_workers: int = 1  # gateway processes that stream tokens_per_s each below GATEWAY_BUSY (gateway_workers)

    @property
    def bound(self) -> str:
        """What sets a layer's time."""
        if self.layer_us <= 0:
            return "-"
        if not self.pingpong_holds:
            return "communication (the pipeline does not hide T_c)"
        return "attention" if self.attention_us >= self.lanes * self.experts_us else "experts"


class ModelCosts:
    """Bytes and flops of a ModelSpec's parts, per layer kind."""

    def __init__(self, spec: ModelSpec, dtype_bytes: int = 2):
        self.spec, self.elt = spec, dtype_bytes
        h, heads = spec.hidden_size, spec.num_heads
        if spec.mla is None:
            q_out, kv_out = heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            attention = h * (q_out + 2 * kv_out) + q_out * h
            self.attention_flops_per_context = 4 * heads * spec.head_dim  # q.k and p.v per cached token
        else:
            mla = spec.mla
            q = h * heads * mla.qk_head_dim if mla.q_lora_rank is None else \
                mla.q_lora_rank * (h + heads * mla.qk_head_dim)
            attention = q + h * (mla.kv_lora_rank + mla.qk_rope_head_dim) + \
                mla.kv_lora_rank * heads * (mla.qk_nope_head_dim + mla.v_head_dim) + heads * mla.v_head_dim * h
            self.attention_flops_per_context = 2 * heads * (2 * mla.kv_lora_rank + mla.qk_rope_head_dim)
        shared = 3 * h * spec.shared_intermediate_size
        self.moe_attention_params = attention + h * spec.num_experts + shared  # + router and shared experts
        self.dense_attention_params = attention + 3 * h * spec.dense_intermediate_size
        self.expert_params = 3 * h * spec.expert_intermediate_size
        heads_kv, dim, tensors = entry_layout(spec)
        self.kv_bytes_per_token_layer = tensors * heads_kv * dim * dtype_bytes
        self.moe_layers = len(spec.moe_layer_ids)
        self.dense_layers = spec.num_layers - self.moe_layers
        self.embedding_params = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
        self.message = CostModel(hidden_size=h, dtype_bytes=dtype_bytes)

    def attention_side_bytes(self) -> float:
        """Weights an attention node holds: every layer's attention side, embeddings and lm_head."""
        return self.elt * (self.moe_layers * self.moe_attention_params + self.dense_layers *
                           self.dense_attention_params + self.embedding_params + 2 * self.spec.hidden_size *
                           self.spec.num_layers)

    def experts_bytes(self, experts: int) -> float:
        return self.elt * experts * self.moe_layers * self.expert_params

    def kv_bytes_per_token(self) -> float:
        return self.kv_bytes_per_token_layer * self.spec.num_layers


def _floor_us(bytes_: float, flops: float, gpu: GpuType, cal: Calibration) -> float:
    bandwidth = gpu.hbm_tb_s * 1e12 * cal.bandwidth_efficiency
    peak = gpu.bf16_tflops * 1e12 * cal.flops_efficiency
    return max(bytes_ / bandwidth, flops / peak) * 1e6


def attention_us(costs: ModelCosts, gpu: GpuType, cal: Calibration, tokens: float, context: float,
                 dense: bool = False, sequences: float | None = None, prefill: bool = False) -> float:
    """One layer's attention part for `tokens` new tokens each attending to `context` cached tokens, in `sequences`
    sequences (default: one token each, decode); each sequence's cache is read once. prefill: a chunk of prompts
    (context: the mean causal span, half a prompt), their K/V written once, timed by the prefill line where the
    calibration has one (bench layer --prefill-tokens: eager, per chunk token)."""
    if tokens <= 0:
        return 0.0
    params = costs.dense_attention_params if dense else costs.moe_attention_params
    cached = tokens if prefill else (sequences or tokens) * context
    bytes_ = costs.elt * params + cached * costs.kv_bytes_per_token_layer + 4 * tokens * costs.spec.hidden_size * \
        costs.elt
    flops = 2 * tokens * params + tokens * context * costs.attention_flops_per_context
    floor = _floor_us(bytes_, flops, gpu, cal)
    if prefill and cal.prefill_attention is not None:
        return cal.prefill_attention(floor, tokens)
    # the host's share is per sequence (the CPU path loops over sequences; bench layer's rows are one token each)
    return cal.attention(floor, sequences or tokens)


def experts_us(costs: ModelCosts, gpu: GpuType, cal: Calibration, tokens: float, experts_on_node: int,
               prefill: bool = False) -> float:
    """One layer's experts on one node for `tokens` tokens sent by one attention node (or, colocated, its own): their
    share of the top-k choices (uniform routing) and the weights of the distinct experts they touch. prefill: timed
    by the eager prefill line where the calibration has one."""
    spec = costs.spec
    if tokens <= 0:
        return 0.0
    choices = tokens * spec.top_k * experts_on_node / spec.num_experts
    touched = experts_on_node * (1 - (1 - spec.top_k / spec.num_experts) ** tokens)
    bytes_ = costs.elt * (touched * costs.expert_params + 2 * choices * spec.hidden_size)
    rows = experts_on_node * padded_rows(round(tokens), spec.top_k, spec.num_experts) if cal.experts_in_blocks \
        else choices
    floor = _floor_us(bytes_, 2 * rows * costs.expert_params / cal.experts_math_rate, gpu, cal)
    line = cal.prefill_experts if prefill and cal.prefill_experts is not None else cal.experts
    return line(floor, choices / spec.top_k)


@functools.lru_cache(maxsize=4096)
def padded_rows(tokens: int, top_k: int, num_experts: int) -> float:
    """Expected rows one expert's blocks hold in the Triton fused MoE (its rows rounded up to whole blocks of
    fused_moe_triton.block_rows, each computed whole), routing uniform: an expert's rows are Binomial(tokens,
    top_k / experts). Mixtral's experts at 512 tokens average 128 rows, one block; half of them spill into a second,
    and the layer takes 1.5x its time at 384 tokens (RESULTS.md, thirteenth session)."""
    from ..ops.fused_moe_triton import block_rows
    if tokens <= 0:
        return 0.0
    block, p = block_rows(tokens, top_k, num_experts), min(1.0, top_k / num_experts)
    if p >= 1.0:
        return float(-(-tokens // block) * block)
    mean, spread = tokens * p, math.sqrt(tokens * p * (1 - p))
    low, high = max(0, int(mean - 10 * spread) - 1), min(tokens, int(mean + 10 * spread) + 2)
    log_pmf = [math.lgamma(tokens + 1) - math.lgamma(n + 1) - math.lgamma(tokens - n + 1) + n * math.log(p)
               + (tokens - n) * math.log1p(-p) for n in range(low, high + 1)]
    return sum(math.exp(lp) * -(-n // block) * block for n, lp in zip(range(low, high + 1), log_pmf))


def fanout(spec: ModelSpec, expert_nodes: int) -> float:
    """Expected distinct expert nodes a token is sent to, contiguous blocks of experts per node (the default
    placement), routing uniform over experts; group-limited routing (DeepSeek-V3: the top 4 of 8 groups, whose blocks
    of 32 experts line up with 8 nodes) reaches at most top_groups such nodes."""
    return _fanout(spec.num_experts, spec.top_k, spec.num_expert_groups, spec.top_groups, expert_nodes)


@functools.lru_cache(maxsize=None)
def _fanout(experts: int, top_k: int, groups: int, top_groups: int, nodes: int) -> float:
    if groups <= 1:
        per_node = experts / nodes
        missed = experts - round(per_node)
        miss = math.comb(missed, top_k) / math.comb(experts, top_k) if missed >= top_k else 0.0
        return nodes * (1 - miss)
    # group-limited: sampled with a fixed seed through the routing the simulator's synthetic traces use (groups
    # ranked by their best two scores, as DeepSeek-V3 does, so nearly every chosen group gets an expert)
    import numpy as np

    from ..placement.synthetic import group_limited_top_k
    scores = np.random.default_rng(0).gumbel(size=(4000, experts))
    node = group_limited_top_k(scores, top_k, groups, top_groups) * nodes // experts
    node.sort(axis=1)
    return float((1 + (np.diff(node, axis=1) != 0).sum(axis=1)).mean())


def comm_us(costs: ModelCosts, plan: Deployment, cal: Calibration, tokens: float) -> float:
    """T_c: one way of one M2N round for a microbatch of `tokens` per attention node (half the measured round).
    The busier side sets it: an attention node sends to every expert node it needs, an expert node receives from
    every attention node."""
    if plan.colocated or tokens <= 0:
        return 0.0
    if cal.served is not None:  # its host work is the nodes' (served_host_us); what remains is latency ...
        # ... and the wait for the slowest of the expert nodes a microbatch reaches, half of it each way
        slower = cal.served.slower_of_two_us
        return cal.served.crossing_us + (slower * slowest_of(reached(costs, plan, tokens)) / 2 if slower else 0.0)
    spec, reach = costs.spec, fanout(costs.spec, plan.expert_nodes)
    per_token = costs.message.bytes_per_message + ROUTING_BYTES_PER_CHOICE * spec.top_k
    sent = tokens * reach * per_token  # from one attention node, one way
    received = tokens * plan.attention_nodes * reach / plan.expert_nodes * per_token  # into one expert node
    across_hosts = plan.gpus > plan.gpus_per_host
    link = min(plan.attention_gpu.inter_host_gb_s if across_hosts else plan.attention_gpu.intra_host_gb_s,
               plan.expert_gpu.inter_host_gb_s if across_hosts else plan.expert_gpu.intra_host_gb_s) * 1e9
    slope = cal.round.slope * (cal.round_link_bytes_per_s / link if cal.round_link_bytes_per_s else 1.0)
    overhead = cal.round.overhead_us * (max(reach, plan.attention_nodes) if cal.round_per_destination else 1.0)
    return (overhead + slope * max(sent, received) + cal.round.per_token_us * tokens) / 2


def reached(costs: ModelCosts, plan: Deployment, tokens: float) -> float:
    """Expert nodes a microbatch of `tokens` sends anything to, on average (each token reaches fanout of them)."""
    share = fanout(costs.spec, plan.expert_nodes) / plan.expert_nodes  # of a token's messages, one node's
    return plan.expert_nodes * (1 - (1 - share) ** tokens)


def slowest_of(k: float) -> float:
    """What waiting for the slowest of k nodes adds over the median, in units of the slower of two: the mean of the
    largest of k normal draws by Blom's formula, Φ⁻¹((k - 0.375) / (k + 0.25)), over that of two (0 for one node;
    within 4% of the exact means for k = 2..8; k need not be whole: the nodes a microbatch reaches on average)."""
    return _largest_of(k) / _largest_of(2) if k > 1 else 0.0


def _largest_of(k: float) -> float:
    return _NORMAL.inv_cdf((k - 0.375) / (k + 0.25))


_NORMAL = statistics.NormalDist()


def served_host_us(costs: ModelCosts, plan: Deployment, cal: Calibration,
                   tokens: float) -> tuple[float, float, float, float]:
    """Host work of one served M2N round of a microbatch of `tokens`, µs: (attention node, expert node) in their
    phases, a Dispatch built, sent and answered per expert node reached, a Combine sent back for it; then the same
    two nodes' background CPU for those messages (calibration.Served)."""
    if plan.colocated or cal.served is None or tokens <= 0:
        return 0.0, 0.0, 0.0, 0.0
    messages = reached(costs, plan, tokens)  # expert nodes a microbatch sends anything
    served = cal.served
    return (served.dispatch_us * messages, served.answer_us * messages / plan.expert_nodes,
            served.attention_background_us * messages, served.expert_background_us * messages / plan.expert_nodes)


def layer_us(t_a: float, t_e: float, t_c: float, m: int, plan: Deployment,
             background: tuple[float, float] = (0.0, 0.0)) -> float:
    """One MoE layer for m microbatches. Colocated: the node does both parts in turn. Disaggregated: each microbatch
    goes attention -> link -> experts -> link. An expert node computes each attention node's microbatches apart (T_e
    each: a lane per attention node in lockstep rounds, expert_node/lockstep.py; the message path computes what has
    arrived: one attention node's dispatch in 2037 of 2088 rounds served 2x2, benchmarks/RESULTS.md), so a layer takes
    the longest of the attention node's m·T_a, the expert node's A·m·T_e (A attention nodes) and one microbatch's
    round trip T_a + T_e + 2·T_c. Nodes sharing devices also wait for every node's work to pass through them, and
    where several attention nodes share them, their parts do not overlap the expert nodes' lanes: a layer is the
    attention nodes' work, then the expert nodes' A lanes, then the crossings. (The CPU rows of 2 attention and 2
    expert nodes on 2 cores kept only 1.66-1.70 of the cores busy; with this the 10 runs that have a traced
    calibration went from +3..+33% to -16..+8%: RESULTS.md, fifteenth session.)
    `background`: each node's CPU per microbatch beside T_a, T_e (served.py): busy, but off the round trip."""
    attention_node = m * (t_a + background[0])
    expert_node = plan.attention_nodes * m * (t_e + background[1])
    critical = m * (t_a + t_e) if plan.colocated else max(attention_node, expert_node, t_a + t_e + 2 * t_c)
    if not plan.shared_devices:
        return critical
    if not plan.colocated and plan.attention_nodes > 1:
        critical = max(critical, attention_node + expert_node + 2 * t_c)
    work = plan.attention_nodes * (attention_node if not plan.colocated else m * (t_a + t_e)) + \
        plan.expert_nodes * expert_node
    return max(critical, work / min(plan.shared_devices, plan.gpus))


def pipeline_us(t_a: float, t_e: float, t_c: float, m: int, layers: int, plan: Deployment,
                background: tuple[float, float] = (0.0, 0.0)) -> float:
    """A disaggregated step's MoE layers as one pipeline of layers·m rounds, which each step fills and drains: the
    step ends with sampling, so its first microbatch's attention and crossing come before the busiest node's first
    round, and its last answer's crossing and combine after its last (the whole-step graphs of 2 x H200 showed
    it: the expert GPU idles between steps). The busiest node works layers·m·T_f; one microbatch's round trip less
    T_f is the fill. 0 colocated (no pipeline) and on shared devices (layer_us counts their turns)."""
    if plan.colocated or plan.shared_devices or layers <= 0:
        return 0.0
    t_f = max(t_a + background[0], plan.attention_nodes * (t_e + background[1]))
    return layers * m * t_f + max(0.0, t_a + t_e + 2 * t_c - t_f)


def moe_layers_us(t_a: float, t_e: float, t_c: float, m: int, layers: int, plan: Deployment,
                  background: tuple[float, float] = (0.0, 0.0)) -> float:
    """A step's MoE layers: each layer's bound (layer_us: at m = 1 nothing overlaps, a layer waits for the last) or
    the pipeline of rounds (pipeline_us), whichever is longer."""
    return max(layers * layer_us(t_a, t_e, t_c, m, plan, background),
               pipeline_us(t_a, t_e, t_c, m, layers, plan, background))


def memory(costs: ModelCosts, plan: Deployment, utilization: float = 0.9) -> tuple[Memory, Memory | None]:
    """Per GPU of each role: weights, the KV cache of the batch at full context, the activation margin."""
    gpu = plan.attention_gpu
    experts_here = costs.experts_bytes(costs.spec.num_experts) if plan.colocated else 0.0
    kv = plan.batch_per_attention_node * plan.context_len * costs.kv_bytes_per_token()
    attention = Memory(costs.attention_side_bytes() + experts_here, kv, CUDA_ACTIVATION_MARGIN * gpu.hbm_bytes,
                       utilization * gpu.hbm_bytes)
    if plan.colocated:
        return attention, None
    per_node = math.ceil(costs.spec.num_experts / plan.expert_nodes)
    expert = Memory(costs.experts_bytes(per_node), 0.0, CUDA_ACTIVATION_MARGIN * plan.expert_gpu.hbm_bytes,
                    utilization * plan.expert_gpu.hbm_bytes)
    return attention, expert


def step_parts(costs: ModelCosts, plan: Deployment, cal: Calibration, tokens: float, context: float,
               microbatches: int, sequences: float | None = None,
               prefill: bool = False) -> tuple[float, float, float, float]:
    """(T_a, T_e, T_c, step µs) of a step of `tokens` new tokens per attention node at `context`, of `sequences`
    sequences (default: one token each, decode): lm_head runs on each sequence's last token only. prefill: the
    tokens are prompts (eager prefill lines; the served factors, measured on decode steps, are left out)."""
    m = microbatches
    per_mb = tokens / m
    expert_gpu = plan.attention_gpu if plan.colocated else plan.expert_gpu
    experts_on_node = costs.spec.num_experts if plan.colocated else math.ceil(costs.spec.num_experts /
                                                                               plan.expert_nodes)
    per_mb_sequences = sequences / m if sequences else None
    t_a = attention_us(costs, plan.attention_gpu, cal, per_mb, context, sequences=per_mb_sequences, prefill=prefill)
    t_e = experts_us(costs, expert_gpu, cal, per_mb * (1.0 if plan.colocated else plan.expert_load_imbalance),
                     experts_on_node, prefill=prefill)
    t_c = comm_us(costs, plan, cal, per_mb)
    dense = costs.dense_layers * m * attention_us(costs, plan.attention_gpu, cal, per_mb, context, dense=True,
                                                  sequences=per_mb_sequences, prefill=prefill)
    host_a, host_e, *background = served_host_us(costs, plan, cal, per_mb)  # host work in and beside the round
    if cal.served is not None and not plan.colocated:  # parts as served, and the round's host work beside them
        served = cal.served
        attention_factor, experts_factor, attention_extra, experts_extra = (1.0, 1.0, 0.0, 0.0) if prefill else (
            *served.factors_at(per_mb), served.attention_extra_us, served.experts_extra_us)
        t_a, dense = t_a * attention_factor + attention_extra + host_a, dense * attention_factor
        t_e = t_e * experts_factor + experts_extra + host_e
    lm_head = _floor_us(costs.elt * costs.spec.vocab_size * costs.spec.hidden_size,
                        2 * (sequences or tokens) * costs.spec.vocab_size * costs.spec.hidden_size,
                        plan.attention_gpu, cal)
    layers = moe_layers_us(t_a, t_e, t_c, m, costs.moe_layers, plan, background)
    outside = 0.0 if prefill else cal.step_outside_graph_us  # (prefill: an eager microbatch within a step)
    device, host = layers + dense + lm_head + outside, cal.step_host_us(sequences or tokens)
    step = max(device, host) if plan.async_scheduling and not prefill else device + host
    return t_a, t_e, t_c, step


# The busiest a gateway process should run. In served rows on one H200 the TTFT p50 grew with the 4 gateways' load,
# 25-35 ms at 75-90% busy and 50-57 ms at 91-99%, which the model, counting a gateway only as a bound, does not see
# (RESULTS.md, thirteenth session): 70% leaves headroom.
GATEWAY_BUSY = 0.7


def gateway_workers(cal: Calibration, tokens_per_s: float, steps_per_s: float, attention_nodes: int) -> int:
    """Gateway processes that stream tokens_per_s at most GATEWAY_BUSY busy each: cal's CPU per token, and per step
    message (every attention node sends one to each gateway process each step). 1 where cal has not measured it."""
    per_worker = GATEWAY_BUSY - steps_per_s * attention_nodes * cal.gateway_us_per_message / 1e6
    need = tokens_per_s * cal.gateway_us_per_token / 1e6
    if need <= 0:
        return 1
    if per_worker <= 0:
        raise ValueError(f"a gateway process spends {cal.gateway_us_per_message:.0f} us on each of "
                         f"{steps_per_s * attention_nodes:.0f} step messages a second: more than it has")
    return max(1, math.ceil(need / per_worker))


def graphed_step_us(costs: ModelCosts, plan: Deployment, cal: Calibration, decodes: int, decode_context: float,
                    prompt_tokens: float, prompts: float, span: float) -> float:
    """A step that replays a CUDA graph of the whole step with prompt tokens beside its decodes (attention_node/
    model_runner.py): the prompt tokens share the decodes' microbatches, so the experts read their weights once for
    both (each prompt token costed as a decode token at its context; span: the prompts' mean causal span, the tokens
    fed before this chunk and half of it). Their attention beyond that is added on the attention GPU in full: as
    served graphs with short prompts measured it (cal.mixed_attention_extra_us a layer), or, where cal has a prefill
    line, at the prefill efficiency (a long prompt's chunk is compute-bound: 6x its floor on an H200 where a decode
    is 1.05x; RESULTS.md, eleventh session), an upper bound under ping-pong."""
    width = decodes + prompts
    context = (decodes * decode_context + prompts * span) / width
    step = step_parts(costs, plan, cal, decodes + prompt_tokens, context, min(plan.microbatches, math.ceil(width)),
                      sequences=width)[3]
    if cal.prefill_attention is None:
        return step + costs.spec.num_layers * cal.mixed_attention_extra_us
    return step + costs.spec.num_layers * max(0.0, attention_us(
        costs, plan.attention_gpu, cal, prompt_tokens, span, sequences=prompts, prefill=True)
        - attention_us(costs, plan.attention_gpu, cal, prompt_tokens, span, sequences=prompts))


def predict(spec: ModelSpec, plan: Deployment, cal: Calibration, prompt_len: int, output_len: int,
            utilization: float = 0.9, max_batch_tokens: int = 2048,
            prefill_graph_tokens: int | None = None) -> Prediction:
    """Steady state with every attention node holding batch_per_attention_node sequences at mid-output context; the
    prompts that replace finished sequences (batch / output_len of them a step) ride in steps as closed_loop costs
    them: steps of at most prefill_graph_tokens tokens (None: max_batch_tokens, the engine's default) replay a CUDA
    graph with the prompt tokens inside (graphed_step_us), longer ones run the prompts as one more eager microbatch."""
    costs = ModelCosts(spec, plan.dtype_bytes)
    batch = plan.batch_per_attention_node
    context = prompt_len + output_len / 2
    t_a, t_e, t_c, step = step_parts(costs, plan, cal, batch, context, plan.microbatches)
    # a step that carries prompts: as many as finish a step (at least one), within the step's token budget
    prompts_per_step = batch / output_len
    fed = min(math.ceil(prompts_per_step) * prompt_len, max(1, max_batch_tokens - batch))
    limit = max_batch_tokens if prefill_graph_tokens is None else min(prefill_graph_tokens, max_batch_tokens)
    prompts, span = max(1.0, fed / prompt_len), min(prompt_len, fed) / 2
    if batch + fed <= limit:
        carrying = graphed_step_us(costs, plan, cal, batch, context, fed, prompts, span)
    else:  # the prompts as one more microbatch, eager (a disaggregated one: at least its layers' launches)
        carrying = step + step_parts(costs, plan, cal, fed, span, 1, sequences=prompts, prefill=True)[3] - \
            cal.step_overhead_us
        if not plan.colocated:
            carrying = max(carrying, costs.moe_layers * cal.eager_layer_us)
    prefill = (carrying - step) * prompt_len / fed  # one prompt's share of the step that carries it
    step_with_prefills = step + prompts_per_step * prefill
    tokens_per_s = plan.attention_nodes * batch / step_with_prefills * 1e6
    attention_mem, expert_mem = memory(costs, plan, utilization)
    m = plan.microbatches
    holds = plan.colocated or m * max(t_a, plan.attention_nodes * t_e) >= t_a + t_e + 2 * t_c
    # the p99 step carries prompts once at least 1% of steps do
    p99 = step if prompts_per_step * prompt_len / fed < 0.01 else carrying
    background = served_host_us(costs, plan, cal, batch / m)[2:]
    return Prediction(t_a, t_e, t_c, layer_us(t_a, t_e, t_c, m, plan, background), step, prefill, tokens_per_s,
                      p99, holds, attention_mem, expert_mem,
                      1 if plan.colocated else plan.attention_nodes,
                      gateway_workers(cal, tokens_per_s, 1e6 / step_with_prefills, plan.attention_nodes))


def closed_loop(spec: ModelSpec, plan: Deployment, cal: Calibration, jobs: list[tuple[int, int]],
                concurrency: int, max_batch_tokens: int = 2048, gateway_workers: int = 1,
                max_waiting_steps: int = 0, prefill_graph_tokens: int = 0,
                node_shares: list[float] | None = None) -> dict:
    """A finite closed-loop run as `bench serve` drives it (jobs of (prompt, output) tokens, `concurrency` in flight,
    spread evenly over the attention nodes, or by node_shares: each node's share of the jobs and of the requests
    in flight, as a measured run's gateways routed them), stepped with the model's step times: what a short
    measured run sees, ramp-up and tail included. Scheduling is the attention node's (attention_node/scheduler.py): a token budget of
    max_batch_tokens a step, a token for each decoding sequence first, then chunks of the prompts being prefilled,
    oldest first, then new prompts while a batch slot and budget are free (beside decodes, after they have waited
    max_waiting_steps steps or would fill the budget); a step's prompt tokens run beside its decodes as one more
    microbatch (eager, the prefill lines; a disaggregated one takes at least cal.eager_layer_us per MoE layer),
    except in steps of at most prefill_graph_tokens tokens, which replay a CUDA graph with the prompt tokens inside
    the decodes' microbatches; a prompt's first token comes with its last chunk.
    Returns tokens_per_s, TTFT and TPOT p50 in ms, the share of the run's node time spent in prefill parts, and the
    share of its steps that carry prompts beside decodes (mixed steps, which a disaggregated attention node runs
    eagerly whole: attention_node/model_runner.py). Where the calibration measured the gateway's CPU per streamed
    token (and per step message: each step sends one to each gateway process with requests in it), the gateway is
    a serial stage: the run lasts at least that CPU over its gateway_workers processes, and the requests wait the
    difference before their first token (Little's law over `concurrency`). The host path's latency
    (cal.host_latency_us) delays each request's arrival after the one before it in its slot finished, and adds to
    the TTFT the client sees. With async scheduling a step is
    scheduled while the one before it runs (attention_node/node.py's _engine), so a request joins the step after
    next: a finished request's slot stays empty for a step more, and a first token comes a step later."""
    costs = ModelCosts(spec, plan.dtype_bytes)
    nodes = plan.attention_nodes
    if node_shares is None:
        per_node, in_flight = [jobs[i::nodes] for i in range(nodes)], [max(1, concurrency // nodes)] * nodes
    else:
        if len(node_shares) != nodes or min(node_shares) < 0 or sum(node_shares) <= 0:
            raise ValueError(f"node_shares {node_shares}: need {nodes} non-negative shares")
        ends = [round(len(jobs) * sum(node_shares[:i + 1]) / sum(node_shares)) for i in range(nodes)]
        per_node = [jobs[start:end] for start, end in zip([0] + ends, ends)]
        in_flight = [max(1, round(concurrency * share / sum(node_shares))) for share in node_shares]
    slots = max(in_flight)
    finish, tpots, ttfts, prefill_us, busy_us, steps, mixed = 0.0, [], [], 0.0, 0.0, 0, 0
    for node_jobs, node_slots in zip(per_node, in_flight):
        queue = list(node_jobs)
        # when each free slot's next request reaches the node: its predecessor's last token, plus the host path
        freed = [cal.host_latency_us] * min(node_slots, plan.batch_per_attention_node)
        running: list[list] = []  # [prompt, prompt tokens fed, outputs left, outputs made, arrival, first token]
        now, held, last_step = 0.0, 0, 0.0
        while queue or running:
            decoding = [r for r in running if r[1] == r[0]]
            budget, chunks = max_batch_tokens - len(decoding), []  # chunks: (sequence, tokens fed this step)
            for r in running:
                if r[1] < r[0] and budget > 0:
                    chunks.append((r, min(r[0] - r[1], budget)))
                    budget -= chunks[-1][1]
            # a request waits for each free slot (closed loop)
            if max_waiting_steps and decoding and queue and freed and held < max_waiting_steps and \
                    sum(prompt for prompt, _ in queue[:len(freed)]) < budget:
                held += 1  # as the scheduler's _hold_admissions
            else:
                held = 0
            # the requests that had arrived when this step was scheduled (async: as the step before it started)
            scheduled = now - last_step if plan.async_scheduling else now
            if not running and queue and freed and freed[0] > scheduled:
                now = scheduled = max(now, freed[0])  # an idle node schedules as a request arrives
            while queue and freed and freed[0] <= scheduled and budget > 0 and not held:
                prompt, out = queue.pop(0)
                running.append([prompt, 0, out, 0, freed.pop(0), 0.0])
                chunks.append((running[-1], min(prompt, budget)))
                budget -= chunks[-1][1]
            step = 0.0
            tokens = sum(n for _, n in chunks)
            if chunks and tokens + len(decoding) <= prefill_graph_tokens:
                step = graphed_step_us(costs, plan, cal, len(decoding),
                                       sum(r[0] + r[3] for r in decoding) / max(1, len(decoding)), tokens,
                                       len(chunks), sum(r[1] + n / 2 for r, n in chunks) / len(chunks))
                prefill_us += step * tokens / (len(decoding) + tokens)
                mixed += bool(decoding)
            elif decoding:
                context = sum(r[0] + r[3] for r in decoding) / len(decoding)
                step += step_parts(costs, plan, cal, len(decoding), context,
                                   min(plan.microbatches, len(decoding)))[3]
            if chunks and tokens + len(decoding) > prefill_graph_tokens:  # eager: one more microbatch of the step
                context = sum(r[1] + n / 2 for r, n in chunks) / len(chunks)
                prefill = step_parts(costs, plan, cal, tokens, context, 1, sequences=len(chunks),
                                     prefill=True)[3] - (cal.step_overhead_us if decoding else 0.0)
                step += prefill
                prefill_us += prefill
                mixed += bool(decoding)
                if not plan.colocated:  # at least its layers' launches, one by one
                    step = max(step, costs.moe_layers * cal.eager_layer_us)
            now += step
            last_step = step
            steps += 1
            busy_us += step
            for r, n in chunks:
                r[1] += n
                if r[1] == r[0]:  # its last chunk: the first token
                    ttfts.append(now - r[4])
                    r[5] = now
            for r in decoding + [r for r, _ in chunks if r[1] == r[0]]:
                r[2], r[3] = r[2] - 1, r[3] + 1
                if r[2] == 0:
                    freed.append(now + cal.host_latency_us)
                    if r[3] > 1:
                        tpots.append((now - r[5]) / (r[3] - 1))
            running = [r for r in running if r[2] > 0]
        finish = max(finish, now)
    tpots.sort()
    ttfts.sort()
    tokens = sum(out for _, out in jobs)
    messages = steps * min(gateway_workers, slots)
    gateway_us = (tokens * cal.gateway_us_per_token + messages * cal.gateway_us_per_message) / gateway_workers
    waiting_us = max(0.0, gateway_us - finish) * min(concurrency, len(jobs)) / max(1, len(jobs))
    finish = max(finish, gateway_us)
    return {"tokens_per_s": tokens / finish * 1e6,
            "ttft_ms_p50": (ttfts[len(ttfts) // 2] + waiting_us + cal.host_latency_us) / 1e3 if ttfts else 0.0,
            "tpot_ms_p50": tpots[len(tpots) // 2] / 1e3 if tpots else 0.0,
            "prefill_share": prefill_us / busy_us if busy_us else 0.0,
            "mixed_step_share": mixed / steps if steps else 0.0, "gateway_bound": gateway_us >= finish > 0,
            "steps": steps}
