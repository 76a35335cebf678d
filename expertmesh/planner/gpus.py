"""GPU types a plan may use: a built-in table from NVIDIA's public datasheets, overridable by a YAML/JSON file.

Throughputs are the dense (no sparsity) bf16 Tensor Core figures; bandwidths are per direction."""
from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace

from ..config import ConfigError, read_structured


@dataclass(frozen=True)
class GpuType:
    name: str
    hbm_gib: float  # device memory
    hbm_tb_s: float  # memory bandwidth, TB/s (1e12 bytes/s)
    bf16_tflops: float  # dense bf16 Tensor Core peak
    intra_host_gb_s: float  # GPU to GPU within a host, one direction (NVLink, else PCIe)
    inter_host_gb_s: float  # GPU to GPU across hosts, one direction (the host's NIC per GPU)
    count: int = 0  # on offer; 0: none
    price_per_hour: float | None = None  # None: not given (plans are then ranked per GPU)
    device_names: tuple[str, ...] = ()  # what torch.cuda.get_device_name reports for it (substrings)

    @property
    def hbm_bytes(self) -> float:
        return self.hbm_gib * 2 ** 30

    def matches(self, device_name: str) -> bool:
        """Whether torch.cuda.get_device_name's answer is this type."""
        # whole words: "NVIDIA H200" is not an H20
        return any(re.search(rf"(?<![A-Za-z0-9]){re.escape(name)}(?![A-Za-z0-9])", device_name, re.IGNORECASE)
                   for name in self.device_names or (self.name,))


# Datasheets (SXM/server parts): NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 80 GB HBM3, 3.35 TB/s, bf16
# 1,979 TFLOPS with sparsity = 989 dense, NVLink 900 GB/s bidirectional); NVIDIA H200 Tensor Core GPU datasheet
# (141 GB HBM3e, 4.8 TB/s, bf16 989 dense, NVLink 900 GB/s); NVIDIA H20 product brief (96 GB HBM3, 4.0 TB/s,
# bf16 148 dense, NVLink 900 GB/s); NVIDIA L40S datasheet (48 GB GDDR6, 864 GB/s, bf16 362 dense, no NVLink:
# PCIe Gen4 x16, 64 GB/s bidirectional); NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM: 2,039 GB/s, bf16
# 312 dense, NVLink 600 GB/s bidirectional). Across hosts: one 400 Gb/s NIC per GPU (50 GB/s) as in the DGX H100 /
# H200 datasheets (8 x ConnectX-7), 200 Gb/s (25 GB/s) per GPU as in the DGX A100 datasheet (ConnectX-6); the
# same 400 Gb/s assumed for H20 and L40S servers (not a datasheet figure: override it for your hosts). No prices:
# they are not datasheet figures; give yours (`--gpus FILE` or `--price NAME=USD`).
GIB_PER_GB = 1e9 / 2 ** 30
BUILTIN: dict[str, GpuType] = {gpu.name: gpu for gpu in (
    GpuType("H100", 80 * GIB_PER_GB, 3.35, 989, 450, 50, device_names=("H100",)),
    GpuType("H200", 141 * GIB_PER_GB, 4.8, 989, 450, 50, device_names=("H200",)),
    GpuType("H20", 96 * GIB_PER_GB, 4.0, 148, 450, 50, device_names=("H20",)),
    GpuType("L40S", 48 * GIB_PER_GB, 0.864, 362, 32, 50, device_names=("L40S",)),
    GpuType("A100", 80 * GIB_PER_GB, 2.039, 312, 300, 25, device_names=("A100",)),
)}


def builtin(name: str) -> GpuType:
    """A built-in type by name (case-insensitive)."""
    for key, gpu in BUILTIN.items():
        if key.lower() == name.lower():
            return gpu
    raise ConfigError(f"unknown GPU type {name!r}; built in: {sorted(BUILTIN)} (or describe it in --gpus FILE)")


def parse_offer(text: str) -> dict[str, int]:
    """'H200:8,H20:16' -> {'H200': 8, 'H20': 16}."""
    offer = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(f"--gpu-offer item {item!r}: write NAME:COUNT with COUNT >= 1, e.g. H200:8")
        offer[name] = int(count)
    return offer


def load_gpus(offer: dict[str, int], path: str | None = None,
              prices: dict[str, float] | None = None) -> list[GpuType]:
    """The types on offer: built-in entries, overridden or extended field by field by the file's `gpus:` list (each
    an entry with `name` and any GpuType field), with the counts of `offer` and the given prices."""
    table = dict(BUILTIN)
    if path:
        known = {f.name for f in fields(GpuType)}
        for entry in read_structured(path).get("gpus") or []:
            bad = set(entry) - known
            if bad or "name" not in entry:
                raise ConfigError(f"{path}: GPU entry {entry!r} has unknown keys {sorted(bad)} or no name; known: "
                                  f"{sorted(known)}")
            entry = {**entry, "device_names": tuple(entry.get("device_names") or (entry["name"],))}
            base = next((gpu for key, gpu in table.items() if key.lower() == entry["name"].lower()), None)
            if base is None:
                missing = {"hbm_gib", "hbm_tb_s", "bf16_tflops", "intra_host_gb_s", "inter_host_gb_s"} - set(entry)
                if missing:
                    raise ConfigError(f"{path}: new GPU type {entry['name']!r} needs {sorted(missing)}")
                table[entry["name"]] = GpuType(**entry)
            else:
                table[base.name] = replace(base, **{k: v for k, v in entry.items() if k != "name"})
    chosen = []
    for name, count in (offer or {k: v.count for k, v in table.items() if v.count}).items():
        gpu = next((g for key, g in table.items() if key.lower() == name.lower()), None)
        if gpu is None:
            raise ConfigError(f"unknown GPU type {name!r}; known: {sorted(table)} (add it to --gpus FILE)")
        price = (prices or {}).get(gpu.name, (prices or {}).get(name, gpu.price_per_hour))
        chosen.append(replace(gpu, count=count, price_per_hour=price))
    if not chosen:
        raise ConfigError("no GPUs on offer: give --gpu-offer NAME:COUNT[,...] or counts in --gpus FILE")
    return chosen


class GpuTypeMismatch(ConfigError):
    """A node found a GPU of another type than its role's plan names."""


def check_node_gpu(expected: str | None, role: str, index: int, device: str, device_name: str | None) -> None:
    """Refuses a node whose device is not the type its role is planned for. device_name: what
    torch.cuda.get_device_name reports for `device` (None on CPU)."""
    if expected is None:
        return
    gpu = next((g for key, g in BUILTIN.items() if key.lower() == expected.lower()), None) or \
        GpuType(expected, 0, 0, 0, 0, 0)
    matches = device_name is not None and gpu.matches(device_name)
    if not matches:
        found = f"{device_name!r} on {device}" if device_name is not None else f"no GPU ({device})"
        raise GpuTypeMismatch(f"{role} node {index}: the plan puts it on {expected} (cluster.{role}_gpu_type), but it "
                              f"found {found}; run it on {expected} or plan again for what this host has")


def check_cluster_gpus(config, device_name_of=None) -> None:
    """Every node of the config against its role's planned GPU type, before anything starts. device_name_of(device)
    -> torch.cuda.get_device_name's answer (injected by tests; None for a CPU device)."""
    cluster = config.cluster
    if cluster.attention_gpu_type is None and cluster.expert_gpu_type is None:
        return
    if device_name_of is None:
        import torch

        def device_name_of(device: str) -> str | None:
            return torch.cuda.get_device_name(device) if device.startswith("cuda") else None
    for role, count, expected in (("attention", cluster.attention_nodes, cluster.attention_gpu_type),
                                  ("expert", cluster.expert_nodes, cluster.expert_gpu_type)):
        for index in range(count):
            device = config.node_device(role, index)
            check_node_gpu(expected, role, index, device, device_name_of(device))

