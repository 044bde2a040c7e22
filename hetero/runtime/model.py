"""`Model`: a loaded checkpoint with its tokenizer, and the Python API (`logits`, `generate`,
chat templating) the CLI and server are built on."""

from __future__ import annotations

import itertools
import math
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from hetero.config import (
    DTYPE_NAMES,
    KV_BLOCK_TOKENS,
    KV_DTYPE_NAMES,
    QUANT_CHOICES,
    TransformerConfig,
    dtype_name,
    read_config_json,
)
from hetero.errors import (
    InvalidRequestError,
    ModelFormatError,
    PromptTooLongError,
    UnsupportedModelError,
)
from hetero.loading.gguf_checkpoint import GGUFCheckpoint
from hetero.loading.safetensors_checkpoint import SafetensorsCheckpoint
from hetero.loading.weights import load_weights, tensor_names
from hetero.models import family_for
from hetero.models.batch import KEY_ENTRIES
from hetero.models.decoder import CausalLM
from hetero.runtime.assembler import (
    CONVERT_TYPES,
    Assembler,
    Backends,
    Placement,
    check_plan_fits,
    run_groups_on_lane,
)
from hetero.runtime.attention.page_selection import SparseAttention
from hetero.runtime.batch import ForwardBatch
from hetero.runtime.engine import Engine, GenerationResult, Request
from hetero.runtime.kv_cache import KVLayerSpec, PagedKVCache
from hetero.runtime.sampling import SamplingParams
from hetero.tokenizer import Tokenizer

if TYPE_CHECKING:
    from hetero.runtime.quantized import QuantReport
    from placement.hardware import Hardware
    from placement.plan import Plan

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# KV cache dtype; "auto": the model dtype. A bf16 cache under float32 compute halves its memory;
# the CPU decode kernels widen it as they read it.
KV_DTYPES = dict(
    zip(KV_DTYPE_NAMES, (None, torch.bfloat16, torch.float16, torch.float32), strict=True)
)


def kv_dtype_name(dtype: torch.dtype) -> str:
    """The KV_DTYPES name of a torch dtype, as plans name it: torch.bfloat16 -> "bf16"."""
    return next(name for name, value in KV_DTYPES.items() if value == dtype)


class Model:
    def __init__(
        self,
        path: Path,
        family: ModuleType,
        config: TransformerConfig,
        net: CausalLM,
        tokenizer: Tokenizer,
    ):
        self.path = path
        self.family = family
        self.config = config
        self.net = net
        self.tokenizer = tokenizer
        self.dtype = net.embed_tokens.weight.dtype
        self.name = path.name
        self.quant_report: QuantReport | None = None  # set by `load` when kernels run weights
        self.placement = Placement()  # where `load` put each tensor group
        self.disk_bytes = 0  # weight bytes computed from the memory-mapped file
        self.kv_dtype = "auto"  # what `new_kv_cache` allocates by default (KV_DTYPES)
        self.sparse_attention: SparseAttention | None = None  # sparse decode in new caches

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights as held: torch parameters plus the CPU kernels' repacked matrices."""
        kernel = sum(m.nbytes for m in self._kernel_modules())
        return kernel + sum(p.numel() * p.element_size() for p in self.net.parameters())

    @property
    def parameter_count(self) -> int:
        """Weights in the model, kernel matrices included (as many values as the checkpoint's)."""
        kernel = sum(math.prod(w.shape) for m in self._kernel_modules() for w in m.matrices)
        return kernel + sum(p.numel() for p in self.net.parameters())

    def _kernel_modules(self) -> list:
        if self.quant_report is None:
            return []
        from hetero.runtime.quantized import NumbaExperts, QuantLinear

        return [m for m in self.net.modules() if isinstance(m, (QuantLinear, NumbaExperts))]

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: str = "auto",
        threads: int | None = None,
        progress: bool = True,
        quant: str = "auto",
        plan: Plan | None = None,
        accelerator: str = "none",
        pcie_gbs: float | None = None,
        expert_cache: str = "score",
        adapter: str | Path | None = None,
    ) -> Model:
        """Open a Hugging Face model directory or a GGUF file (weights memory-mapped, read
        lazily). `quant`: "auto" runs a GGUF file's quantised and BF16 tensors on the CPU
        kernels as stored, a bf16 checkpoint's weights on the BF16 kernel where the CPU has no
        native bf16 matmul, and a float16 or float32 checkpoint's on the F16 / F32 kernel where
        AVX2 runs (all with float32 compute; `auto_kernel_type`); "none" runs everything in
        torch in `dtype`; "q8_0" / "q4_k" / "bf16" / "f16" / "f32" convert float weights at load
        (experts and dense layers). `plan` (from `hetero plan`) says where each tensor group
        runs; a plan made for another model is refused (`PlanMismatchError`). `accelerator`
        ("cuda", "sim", "none") runs the plan's "gpu" groups, within the plan's VRAM budget;
        `pcie_gbs` rate-limits the sim lane's copies; `expert_cache` ("static", "lru",
        "score"): whether and how a layer's experts on the accelerator change by use.
        `adapter`: a LoRA adapter directory (`hetero train`'s or PEFT's) put on the frozen
        model."""
        model_dir = Path(path).expanduser()
        gguf = is_gguf(model_dir)
        if quant not in QUANT_CHOICES:
            raise InvalidRequestError(
                f"quant must be one of {', '.join(QUANT_CHOICES)}; got {quant!r}"
            )
        if threads is None and accelerator == "sim":
            # the sim lane computes on a core of its own: the CPU's share gets the others
            threads = max(1, (os.cpu_count() or 2) - 1)
        if threads is not None:
            set_threads(threads)
        if plan is not None:
            check_plan_fits(plan, model_dir)
        from hetero.runtime.accelerator import open_lane

        vram_bytes = plan.budgets.vram_bytes if plan is not None else 0
        lane = open_lane(accelerator, vram_bytes, pcie_gbs)
        placement = Placement.from_plan(plan, lane, expert_cache, lane_hardware(lane))
        if gguf:
            checkpoint = GGUFCheckpoint(model_dir)
            raw, tokenizer = checkpoint.config, checkpoint.tokenizer
        else:
            raw = read_config_json(model_dir)
        family = family_for(raw)
        config = family.parse_config(raw)
        quant_type, kernels, dtype = kernel_choice(raw, gguf, dtype, quant)
        torch_dtype = resolve_dtype(dtype, raw)
        # weights converted at load are read in the file's dtype (zero-copy), not converted first
        load_dtype = resolve_dtype("auto", raw) if quant_type else torch_dtype
        if not gguf:
            checkpoint = SafetensorsCheckpoint(model_dir)
            tokenizer = Tokenizer.from_dir(model_dir)
        with torch.device("meta"):
            net = family.build(config)
        names = checkpoint.checkpoint_name if gguf else family.checkpoint_name
        backends = Backends(
            stored_kernels=gguf and kernels,
            convert_to=CONVERT_TYPES[quant_type] if quant_type else None,
            load_dtype=load_dtype,
            fp8_block=fp8_block_size(raw),
        )
        tensor_names(net, checkpoint, names, config.tie_word_embeddings)  # refuse gaps first
        began = time.perf_counter()
        built = Assembler(checkpoint, names, placement, backends).build(net)
        keep_float32 = getattr(family, "FLOAT32_PARAMETERS", ())
        load_weights(
            net,
            checkpoint,
            names,
            torch_dtype if quant_type else load_dtype,
            config.tie_word_embeddings,
            fp8_block=backends.fp8_block,
            keep_float32=keep_float32,
            progress=progress,
        )
        report = None
        if kernels:  # imported only here: the kernels' module pulls in Numba
            from hetero.runtime.cpu_glue import install_cpu_glue
            from hetero.runtime.quantized import QuantReport, join_projections

            report = QuantReport()
            for module in built.kernel_modules:
                report.add(module)
            join_projections(net, report)
            report.seconds += time.perf_counter() - began
            if report.modules:
                install_cpu_glue(net)
        net.requires_grad_(False)
        if adapter is not None:
            from hetero.runtime.adapters import apply_adapter

            apply_adapter(net, adapter)
            net.requires_grad_(False)
        net.eval()
        model = cls(model_dir, family, config, net, tokenizer)
        run_groups_on_lane(net, placement)
        model.quant_report = report
        model.placement, model.disk_bytes = placement, built.disk_bytes
        return model

    # ---- forward -------------------------------------------------------------------------

    def logits(self, token_ids: list[int] | torch.Tensor) -> torch.Tensor:
        """A fresh forward over the whole sequence: [len(token_ids), vocab] float32."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
        self._check_ids(ids.tolist())
        with torch.inference_mode():
            return self.net(ids, ForwardBatch.fresh(len(ids))).float()

    def new_kv_cache(
        self, max_tokens: int, max_sequences: int = 1, kv_dtype: str | None = None
    ) -> PagedKVCache:
        """Room for `max_sequences` of `max_tokens`, each layer's cache beside its attention,
        in `kv_dtype` (KV_DTYPES; None: `self.kv_dtype`)."""
        kv_dtype = kv_dtype or self.kv_dtype
        if kv_dtype not in KV_DTYPES:
            raise InvalidRequestError(
                f"unknown KV cache dtype {kv_dtype!r}; choose one of {', '.join(KV_DTYPES)}"
            )
        dtype = KV_DTYPES[kv_dtype] or self.dtype
        blocks = max_sequences * -(-max_tokens // KV_BLOCK_TOKENS)
        sparse = self.sparse_attention
        specs = []
        for layer in self.net.layers:
            entries = layer.self_attn.cache_entries()
            keys = tuple(name for name in entries if name in KEY_ENTRIES) if sparse else ()
            specs.append(KVLayerSpec(entries, dtype, module_device(layer.self_attn), keys))
        cache = PagedKVCache(specs, blocks, KV_BLOCK_TOKENS)
        cache.sparse_attention = sparse
        self._charge_lane(cache)
        return cache

    def expert_cache_hit_rate(self) -> float | None:
        """Share of routed pairs whose expert was in the accelerator's pool, over the layers
        whose pool changes by use (None: none does)."""
        from hetero.runtime.accelerator.cached import CachedExperts

        pools = [m.slots for m in self.net.modules() if isinstance(m, CachedExperts)]
        pairs = sum(s.pairs for s in pools)
        return sum(s.hits for s in pools) / pairs if pools and pairs else None

    def _charge_lane(self, cache: PagedKVCache) -> None:
        """The KV cache of the layers whose attention runs on the lane takes its budget until
        the cache is dropped (an out-of-memory error if it does not fit)."""
        lane = self.placement.lane
        if lane is None:
            return
        nbytes = sum(
            t.numel() * t.element_size()
            for i, layer in enumerate(cache.storage)
            if self.placement.executed_device(f"layers.{i}.attention") == "gpu"
            for t in layer.values()
        )
        lane.reserve(nbytes, f"a KV cache of {cache.num_blocks * cache.block_size} tokens")
        weakref.finalize(cache, lane.release, nbytes)

    # ---- text ----------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        return self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a raw prompt: a string gets the tokenizer's own special tokens (BOS)."""
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        text = self.apply_chat_template(messages, add_generation_prompt=True, **template_kwargs)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        seed: int | None = None,
        stop: list[str] | str | None = None,
        on_text: Callable[[str], None] | None = None,
        logprobs: int | None = None,
        ignore_eos: bool = False,
    ) -> GenerationResult:
        """Complete `prompt` (text or token ids). `on_text` streams each new piece of text;
        `logprobs=n` records each token's log-probability and the top n alternatives;
        `ignore_eos` generates max_new_tokens whatever the model says (benchmarks)."""
        sampling = SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            seed=seed,
        )
        prompt_ids = self.encode_prompt(prompt)
        self._check_ids(prompt_ids)
        if max_new_tokens < 0:
            raise InvalidRequestError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        room = self.config.context_limit - len(prompt_ids)
        request = Request(
            prompt_ids=prompt_ids,
            max_new_tokens=min(max_new_tokens, room),
            sampling=sampling,
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            eos_token_ids=frozenset() if ignore_eos else frozenset(self.eos_token_ids),
            logprobs=logprobs,
        )
        kv = self.new_kv_cache(len(prompt_ids) + request.max_new_tokens)
        engine = Engine(self.net, self.tokenizer, kv, max_running=1, glue_threads=self.glue_threads)
        results: list[GenerationResult] = []

        def listen(event) -> None:
            if event.text and on_text is not None:
                on_text(event.text)
            if event.result is not None:
                results.append(event.result)

        engine.submit(request, listen)
        while not results:
            engine.step()
        return results[0]

    @property
    def glue_threads(self) -> int | None:
        """Torch's threads for small steps (see `Engine`): 1 when the CPU kernels run the
        weights, else None (torch runs the weights and wants all its threads)."""
        report = self.quant_report
        return 1 if report is not None and report.modules else None

    @property
    def eos_token_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids) | set(self.config.eos_token_ids)

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.config.context_limit
        if len(ids) >= limit:
            raise PromptTooLongError(
                f"the prompt has {len(ids)} tokens but {self.name} holds at most {limit} "
                f"(max_position_embeddings); shorten the prompt"
            )
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})"
            )


def lane_hardware(lane) -> Hardware | None:
    """The rates a lane's run-time choices are made by: this machine's (its probe, else the
    defaults), the sim lane's own figures for it."""
    if lane is None:
        return None
    from placement.hardware import load_hardware, sim_accelerator

    hardware = load_hardware(None)
    return sim_accelerator(hardware, lane.pcie_gbs) if lane.kind == "sim" else hardware


def kernel_choice(
    raw_config: dict[str, Any], gguf: bool, dtype: str, quant: str
) -> tuple[str | None, bool, str]:
    """What `Model.load` does with these options: (the type float weights are converted to at
    load or None, whether the CPU kernels run weights, the compute dtype name or "auto")."""
    quant_type = None if quant in ("auto", "none") else quant
    if quant == "auto" and not gguf and dtype == "auto":
        quant_type = auto_kernel_type(raw_config)
    kernels = quant_type is not None or (gguf and quant == "auto")
    if kernels and dtype == "auto":
        dtype = "float32"  # the kernels take and give float32; so does the rest on a CPU
    return quant_type, kernels, dtype


def is_gguf(path: Path) -> bool:
    """Whether `path` is a GGUF file (else a model directory); refuses a path that is neither."""
    gguf = path.suffix == ".gguf" or path.is_file()
    if not gguf and not path.is_dir():
        raise ModelFormatError(f"model directory {path} does not exist")
    return gguf


def compute_dtype(path: Path, dtype: str, quant: str) -> torch.dtype:
    """The dtype a model at `path` computes in when loaded with these options, known before
    it loads (reads config.json, or a GGUF file's metadata only where it must)."""
    gguf = is_gguf(path)
    if gguf and (quant == "auto" or dtype != "auto"):
        return resolve_dtype("float32" if dtype == "auto" else dtype, {})
    raw = GGUFCheckpoint(path).config if gguf else read_config_json(path)
    return resolve_dtype(kernel_choice(raw, gguf, dtype, quant)[2], raw)


def auto_kernel_type(raw_config: dict[str, Any]) -> str | None:
    """The kernel format a float checkpoint's weights run on under quant="auto", or None for
    torch. bfloat16: the BF16 kernel (2 bytes read per weight, float32 math) on every CPU: even
    with AVX-512 BF16, torch's bf16 path decoded 3-8x slower (one call per expert) and
    prefilled no faster (bench/results/bf16-checkpoints.md). float16 and float32: the F16 / F32
    panel kernels where the AVX2 kernels run (for one token torch's F.linear read float32
    weights at 0.4-0.65 of the DRAM ceiling, and it runs a MoE layer's experts one call each)."""
    from cpu_kernels.quant_matrix import host_kernel_path

    dtype = resolve_dtype("auto", raw_config)
    if dtype == torch.bfloat16:
        return "bf16"
    avx2 = host_kernel_path() != "plain"  # avx2, or a path above it in the chain
    return {torch.float16: "f16", torch.float32: "f32"}.get(dtype) if avx2 else None


def set_threads(threads: int) -> None:
    """CPU threads for torch and the Numba kernels."""
    import numba  # here, not at the top: its LLVM costs ~70 MB that torch-only runs don't need

    if threads < 1:
        raise InvalidRequestError(f"threads must be >= 1, got {threads}")
    available = numba.config.NUMBA_NUM_THREADS
    if threads > available:
        raise InvalidRequestError(
            f"threads={threads} but this process can run at most {available} (NUMBA_NUM_THREADS, "
            f"by default the number of cores)"
        )
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)


def fp8_block_size(raw_config: dict[str, Any]) -> tuple[int, int]:
    """Block size of fp8 weights (DeepSeek-V3's release); other quantised formats are refused."""
    quant = raw_config.get("quantization_config") or {}
    method = quant.get("quant_method", "fp8") if isinstance(quant, dict) else "?"
    if method != "fp8":
        raise UnsupportedModelError(
            f"{method!r}-quantised safetensors are not supported; use the bf16/fp16 checkpoint "
            f"or a GGUF file of the model"
        )
    block = quant.get("weight_block_size") or (128, 128)
    return int(block[0]), int(block[1])


def resolve_dtype(dtype: str, raw_config: dict[str, Any]) -> torch.dtype:
    """'auto' keeps the checkpoint's dtype (zero-copy loading); otherwise a name from DTYPES."""
    return DTYPES[dtype_name(dtype, raw_config)]


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's tensors live (the CPU for one that has none, e.g. all kernel weights)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return torch.device("cpu")
