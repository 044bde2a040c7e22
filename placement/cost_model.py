"""Predicted decode and prefill speed of a placement, from the bytes each device reads and the
FLOPs it computes per step against the machine's rates (placement/hardware.py).

Per layer, the parts every token needs (attention with its KV cache reads, norms, router,
dense FFN) run one after another; in the MoE block the GPU's experts (with the shared ones) and
the host's experts run at the same time, the host side paying two activation copies over PCIe,
and the slower side sets the pace. For prefill a host-side expert may instead be copied to
the GPU and run there, whichever is faster (as llama.cpp and KTransformers do for large
batches). The resource that takes the most time on this critical path is the bound."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from placement.hardware import Hardware

PARALLEL_KINDS = ("shared_experts", "expert")
RESOURCE_NAMES = {
    "gpu_memory": "GPU memory bandwidth",
    "gpu_compute": "GPU compute",
    "dram": "DRAM bandwidth",
    "cpu_compute": "CPU compute",
    "disk": "disk reads (mmap)",
    "pcie": "PCIe copies",
    "overhead": "per-layer launch and sync overhead",
}
ACTIVATION_BYTES = 2  # bf16 activations cross PCIe


@dataclass(frozen=True)
class PlacedGroup:
    """What the cost model needs of one placed tensor group."""

    layer: int | None  # None: embeddings, final norm, lm_head
    kind: str
    device: str  # gpu / cpu / disk
    nbytes: int
    params: int
    use_per_token: float  # expected activations per token: 1 unless a routed expert


@dataclass(frozen=True)
class LayerAttention:
    device: str  # where the attention (and its KV cache) runs
    kv_bytes_per_token: int
    flops_per_pair: int  # per (query token, cached token)


@dataclass(frozen=True)
class Prediction:
    decode_tok_s: float
    prefill_tok_s: float
    bound: str  # the resource bounding decode (a key of RESOURCE_NAMES)
    prefill_bound: str
    hardware: str
    # seconds per decode step / per prefill chunk, per resource on the critical path
    decode_seconds: dict[str, float] = field(default_factory=dict)
    prefill_seconds: dict[str, float] = field(default_factory=dict)


def _device_seconds(device: str, nbytes: float, flops: float, hw: Hardware) -> dict[str, float]:
    """The time a device takes to read `nbytes` of weights and compute `flops`: the slower
    of the two (roofline), under the name of the resource that bounds it."""
    if nbytes == 0 and flops == 0:
        return {}
    if device == "gpu":
        memory = ("gpu_memory", nbytes / (hw.hbm_gbs * 1e9))
        compute = ("gpu_compute", flops / (hw.gpu_matmul_tflops * 1e12))
    else:
        rate = hw.disk_read_gbs if device == "disk" else hw.cpu_gemv_gbs
        memory = ("disk" if device == "disk" else "dram", nbytes / (rate * 1e9))
        compute = ("cpu_compute", flops / (hw.cpu_matmul_gflops * 1e9))
    resource, seconds = max(memory, compute, key=lambda item: item[1])
    return {resource: seconds}


def _sum(parts: list[dict[str, float]]) -> Counter:
    """Seconds per resource of parts that run one after another."""
    total: Counter = Counter()
    for part in parts:
        total.update(part)
    return total


def step_seconds(
    groups: list[PlacedGroup],
    attention: dict[int, LayerAttention],
    hidden_size: int,
    vocab_size: int,
    tokens: int,
    sequences: int,
    context: int,
    hw: Hardware,
    prefill: bool,
) -> dict[str, float]:
    """Seconds per resource on the critical path of one step: `tokens` new tokens over
    `sequences` sequences, each attending to `context` cached tokens on average."""
    has_gpu = any(g.device == "gpu" for g in groups)
    by_layer: dict[int | None, list[PlacedGroup]] = defaultdict(list)
    for group in groups:
        by_layer[group.layer].append(group)
    path: Counter = Counter()  # seconds per resource along the critical path
    copy_seconds = 2 * (
        hw.transfer_latency_us * 1e-6
        + tokens * hidden_size * ACTIVATION_BYTES / (min(hw.h2d_gbs, hw.d2h_gbs) * 1e9)
    )
    for layer, members in by_layer.items():
        sequential: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        parallel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for g in members:
            nbytes, flops = _group_work(g, tokens, sequences, vocab_size, prefill)
            target = parallel if g.kind in PARALLEL_KINDS else sequential
            target[g.device][0] += nbytes
            target[g.device][1] += flops
        if layer is None:
            path.update(_sum([_device_seconds(d, b, f, hw) for d, (b, f) in sequential.items()]))
            continue
        att = attention[layer]
        kv = sequential[att.device]
        kv[0] += sequences * context * att.kv_bytes_per_token
        kv[1] += tokens * context * att.flops_per_pair
        path.update(_sum([_device_seconds(d, b, f, hw) for d, (b, f) in sequential.items()]))
        gpu_side = Counter(_device_seconds("gpu", *parallel.get("gpu", (0.0, 0.0)), hw))
        host_side = _sum(
            [_device_seconds(d, *parallel[d], hw) for d in ("cpu", "disk") if d in parallel]
        )
        if prefill and has_gpu and "cpu" in parallel:
            # stream the host's experts to the GPU instead, when that is faster
            cpu_bytes, cpu_flops = parallel["cpu"]
            streamed = _sum(
                [
                    {"pcie": cpu_bytes / (hw.h2d_gbs * 1e9)},
                    _device_seconds("gpu", 0.0, cpu_flops, hw),
                    _device_seconds("disk", *parallel.get("disk", (0.0, 0.0)), hw),
                ]
            )
            if sum(streamed.values()) < sum(host_side.values()):
                host_side = streamed
        sides = {"gpu": gpu_side, "host": host_side}
        attention_side = "gpu" if att.device == "gpu" else "host"
        for side, seconds in sides.items():
            if seconds and side != attention_side:
                seconds["pcie"] += copy_seconds
        path.update(max(sides.values(), key=lambda s: sum(s.values())))
        used = {"gpu" if d == "gpu" else "host" for d in (*sequential, *parallel)}
        overhead = ("gpu" in used) * hw.gpu_layer_overhead_us + ("host" in used) * (
            hw.cpu_layer_overhead_us
        )
        path["overhead"] += overhead * 1e-6
    return dict(path)


def _group_work(
    g: PlacedGroup, tokens: int, sequences: int, vocab_size: int, prefill: bool
) -> tuple[float, float]:
    """Bytes read and FLOPs of one group in a step."""
    if g.kind == "embed":  # a row per token
        return g.nbytes * min(1.0, tokens / max(vocab_size, 1)), 0.0
    if g.kind in ("lm_head", "output_norm"):  # logits of each sequence's last token only
        rows = sequences if not prefill else 1
        return float(g.nbytes), 2.0 * g.params * rows
    use = min(g.use_per_token, 1.0)
    touched = 1.0 - (1.0 - use) ** tokens  # chance that any of the tokens uses the group
    return g.nbytes * touched, 2.0 * g.params * g.use_per_token * tokens


def predict(
    groups: list[PlacedGroup],
    attention: dict[int, LayerAttention],
    hidden_size: int,
    vocab_size: int,
    context: int,
    concurrency: int,
    prefill_chunk: int,
    hw: Hardware,
) -> Prediction:
    """Decode: `concurrency` sequences, one token each, at half the context (the average over
    a full-length generation). Prefill: the first `prefill_chunk` tokens of a prompt."""
    common = dict(hidden_size=hidden_size, vocab_size=vocab_size, hw=hw)
    decode = step_seconds(
        groups,
        attention,
        tokens=concurrency,
        sequences=concurrency,
        context=max(context // 2, 1),
        prefill=False,
        **common,
    )
    chunk = min(prefill_chunk, context)
    prefill = step_seconds(
        groups, attention, tokens=chunk, sequences=1, context=chunk // 2, prefill=True, **common
    )
    return Prediction(
        decode_tok_s=concurrency / max(sum(decode.values()), 1e-12),
        prefill_tok_s=chunk / max(sum(prefill.values()), 1e-12),
        bound=max(decode, key=decode.get),
        prefill_bound=max(prefill, key=prefill.get),
        hardware=hw.source,
        decode_seconds=decode,
        prefill_seconds=prefill,
    )


def streaming_is_faster(
    stored_bytes: float, streamed_bytes: float, flops: float, hw: Hardware
) -> bool:
    """Whether experts held in DRAM are done sooner by copying their weights to the GPU
    (`streamed_bytes` over PCIe, then `flops` there) than computed where they are (their
    `stored_bytes` read and `flops` on the CPU): the prefill choice of `step_seconds`, for
    one batch's experts at run time."""
    on_cpu = sum(_device_seconds("cpu", stored_bytes, flops, hw).values())
    streamed = streamed_bytes / (hw.h2d_gbs * 1e9) + sum(
        _device_seconds("gpu", 0.0, flops, hw).values()
    )
    return streamed < on_cpu
