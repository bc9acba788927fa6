"""`tessera bench`: tessera against transformers (same weights, same process) and against this CPU's matmul limit.

The LLaVA-style benchmark model is built by transformers with random weights, saved, and imported by tessera
through the interop, so both hold exactly the same numbers. Every comparison runs interleaved after a warm-up and
reports medians (see timing.py).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tessera.flops import training_step_flops
from tessera.bench.timing import DecodeClock, interleaved
from tessera.errors import TesseraError
from tessera.linear import backend as linear_backend
from tessera.linear import linear

IMAGE_TOKEN = 3
BOS = 1
# the hybrid (NVLM-H) reads an image of n tokens' side as a thumbnail of n / 4 tokens in the sequence and a 2x2 grid
# of tiles of n / 4 tokens each through cross-attention: the image's n tokens, at its full resolution
HYBRID_TILES = 4
FUSIONS = ("unified", "cross", "hybrid")


@dataclass(frozen=True)
class Sizes:
    """The benchmark model and workload."""

    vision_width: int = 384
    vision_layers: int = 6
    vision_heads: int = 6
    patch: int = 16
    text_width: int = 512
    text_layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    vocab: int = 8192
    image_tokens: int = 256  # per image, after dropping CLS ("default" strategy)
    text_tokens: int = 64  # training: text per sample
    prompt_tokens: int = 32  # prefill: prompt text beside the image
    new_tokens: int = 128  # decode length
    train_batch: int = 8
    decode_batches: tuple[int, ...] = (1, 8)
    scaling_image_tokens: tuple[int, ...] = (64, 256, 1024, 4096)
    scaling_batch: int = 1
    mllama_image_tokens: int = 1024
    matmul_size: int = 2048
    repeats: int = 5

    @property
    def image_size(self) -> int:
        return int(round(self.image_tokens**0.5)) * self.patch


FULL = Sizes()
QUICK = Sizes(vision_width=64, vision_layers=2, vision_heads=2, text_width=64, text_layers=2, heads=4, kv_heads=2,
              vocab=512, image_tokens=16, text_tokens=16, prompt_tokens=8, new_tokens=32, train_batch=2,
              decode_batches=(1, 2), scaling_image_tokens=(16, 64), mllama_image_tokens=16, matmul_size=1024,
              repeats=3)


# --- the models -------------------------------------------------------------------------------------------------
def hf_llava_config(s: Sizes, image_tokens: int | None = None):
    from transformers import LlavaConfig

    side = int(round((image_tokens or s.image_tokens) ** 0.5)) * s.patch
    return LlavaConfig(
        vision_config={"model_type": "clip_vision_model", "image_size": side, "patch_size": s.patch,
                       "hidden_size": s.vision_width, "num_hidden_layers": s.vision_layers,
                       "num_attention_heads": s.vision_heads, "intermediate_size": 4 * s.vision_width},
        text_config={"model_type": "llama", "vocab_size": s.vocab, "hidden_size": s.text_width,
                     "num_hidden_layers": s.text_layers, "num_attention_heads": s.heads,
                     "num_key_value_heads": s.kv_heads, "intermediate_size": int(2.6875 * s.text_width),
                     "max_position_embeddings": 8192, "pad_token_id": 0, "bos_token_id": BOS, "eos_token_id": 2},
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default")


def llava_pair(s: Sizes, directory: Path):
    """(tessera model, transformers model) with identical weights, both in eval mode, fp32."""
    from transformers import LlavaForConditionalGeneration

    from tessera.model import MultimodalLM

    torch.manual_seed(0)
    theirs = LlavaForConditionalGeneration(hf_llava_config(s)).eval()
    theirs.save_pretrained(directory)
    theirs.generation_config.eos_token_id = None  # every generation runs its full length, in both
    ours = MultimodalLM.from_pretrained(directory).eval()
    return ours, theirs


def llava_batch(s: Sizes, batch: int, text_tokens: int, labelled: bool, image_tokens: int | None = None,
                fusion: str = "unified") -> dict[str, torch.Tensor]:
    """BOS, the image's tokens (one marker for Method B, the thumbnail's for the hybrid), then text; labels on the
    text only. The hybrid's image is its thumbnail and a 2x2 grid of tiles, each a quarter of the image's side."""
    n = image_tokens or s.image_tokens
    side = int(round(n**0.5)) * s.patch
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(10, s.vocab, (batch, text_tokens), generator=generator)
    in_sequence = {"unified": n, "cross": 1, "hybrid": n // HYBRID_TILES}[fusion]
    image = torch.full((batch, in_sequence), IMAGE_TOKEN)
    input_ids = torch.cat([torch.full((batch, 1), BOS), image, text], dim=1)
    out = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if fusion == "hybrid":
        out["pixel_values"] = torch.randn(batch, 1 + HYBRID_TILES, 3, side // 2, side // 2, generator=generator)
        out["aspect_ratio_ids"] = torch.ones(batch, dtype=torch.long)  # the one grid, 2x2
    else:
        out["pixel_values"] = torch.randn(batch, 3, side, side, generator=generator)
    if labelled:
        labels = input_ids.clone()
        labels[:, : 1 + image.shape[1]] = -100
        out["labels"] = labels
    return out


# --- the measurements -------------------------------------------------------------------------------------------
def matmul_speeds(s: Sizes) -> dict[str, float]:
    """fp32 GFLOP/s of a large square matmul on this CPU (median), by each kernel tessera can use: PyTorch's
    default (`torch.mm`, MKL) and, where tessera.linear uses it, oneDNN. The peak is the faster of them."""
    n = s.matmul_size
    a, b = torch.randn(n, n), torch.randn(n, n)
    kernels = {"torch.mm": lambda: torch.mm(a, b)}
    if linear_backend() == "onednn":
        kernels["oneDNN"] = lambda: linear(a, b)  # a · bᵀ: the same 2n³ FLOPs
    seconds = interleaved(kernels, repeats=max(5, s.repeats), warmup=2)
    return {name: 2 * n**3 / t / 1e9 for name, t in seconds.items()}


def adamw(model) -> torch.optim.AdamW:
    """The optimizer both sides' own trainers default to: fused AdamW (one kernel for the whole update). tessera's
    trainer uses it, and so does transformers' Trainer with torch ≥ 2.8 (`adamw_torch_fused`)."""
    return torch.optim.AdamW(model.parameters(), 1e-5, fused=True)


def _train_step(model, batch, optimizer, hf: bool):
    inputs = dict(batch)
    if not hf:
        inputs["image_counts"] = [1] * batch["input_ids"].shape[0]
    loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def compare_with_transformers(s: Sizes, compile: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = llava_pair(s, Path(tmp))
    if compile:  # the warm-up call of each measurement compiles
        ours.compile()
    results: dict[str, Any] = {}

    # training step: forward + backward + AdamW, everything trains
    batch = llava_batch(s, s.train_batch, s.text_tokens, labelled=True)
    ours.train(), theirs.train()
    opt_ours, opt_theirs = adamw(ours), adamw(theirs)
    times = interleaved({"tessera": lambda: _train_step(ours, batch, opt_ours, hf=False),
                         "transformers": lambda: _train_step(theirs, batch, opt_theirs, hf=True)}, s.repeats)
    ours.eval(), theirs.eval()
    flops = training_step_flops(ours.config, s.train_batch, s.image_tokens, s.text_tokens + 1, s.text_tokens)
    results["train"] = {name: {"seconds": t, "samples_per_s": s.train_batch / t} for name, t in times.items()}
    results["train"]["flops"] = flops  # MFU is added by `run`, once the peak is known

    # prefill: one image + a prompt → the first generated token
    prompt = llava_batch(s, 1, s.prompt_tokens, labelled=False)
    times = interleaved(_generators(ours, theirs, prompt, 1), s.repeats)
    results["prefill"] = {name: {"seconds": t} for name, t in times.items()}

    # greedy decode: tokens/s over the new tokens after the first, timed inside each call (the prefill left out)
    results["decode"] = {}
    for b in s.decode_batches:
        prompts = llava_batch(s, b, s.prompt_tokens, labelled=False)
        seconds = interleaved(_generators(ours, theirs, prompts, s.new_tokens, timed=True), s.repeats,
                              self_timed=True)
        results["decode"][b] = {name: {"tokens_per_s": b * (s.new_tokens - 1) / t, "seconds": t}
                                for name, t in seconds.items()}
    return results


def _generators(ours, theirs, prompt: dict[str, torch.Tensor], new_tokens: int,
                timed: bool = False) -> dict[str, Any]:
    """One generation per call by each side; with timed, each call returns its decoding's seconds (DecodeClock)."""
    counts = [1] * prompt["input_ids"].shape[0]

    def tessera():
        clock = DecodeClock() if timed else None
        out = ours.generate(**prompt, image_counts=counts, max_new_tokens=new_tokens, eos_token_id=[],
                            streamer=clock)
        assert all(len(seq) == new_tokens for seq in out.sequences)
        return clock.seconds if timed else None

    @torch.no_grad()
    def transformers():
        clock = DecodeClock() if timed else None
        out = theirs.generate(**prompt, max_new_tokens=new_tokens, do_sample=False, streamer=clock)
        assert out.shape[1] == prompt["input_ids"].shape[1] + new_tokens
        return clock.seconds if timed else None

    return {"tessera": tessera, "transformers": transformers}


def tessera_config(s: Sizes, fusion: str, image_tokens: int | None = None):
    """The benchmark model built by tessera alone (no transformers): Method A, Method B (a cross-attention block
    before every 4th layer, as Llama 3.2) or the hybrid (the same blocks; its encoder reads tiles of half the side)."""
    from tessera.config import ModelConfig

    n = image_tokens or s.image_tokens
    side = int(round(n ** 0.5)) * s.patch
    if fusion == "hybrid" and (side // s.patch) % 2:  # the 2x2 grid cuts the image's side of patches in halves
        raise ValueError(f"{n} image tokens: the hybrid's 2x2 tiles need a square of an even number of patches a side")
    tiling = {"image_size": side // 2, "max_num_tiles": HYBRID_TILES, "supported_aspect_ratios": [[2, 2]]} \
        if fusion == "hybrid" else {"image_size": side}
    return ModelConfig.from_dict({
        "vision": {**tiling, "patch_size": s.patch, "hidden_size": s.vision_width,
                   "num_layers": s.vision_layers, "num_heads": s.vision_heads,
                   "intermediate_size": 4 * s.vision_width, "pre_layernorm": True},
        "text": {"vocab_size": s.vocab, "hidden_size": s.text_width, "num_layers": s.text_layers,
                 "num_heads": s.heads, "num_kv_heads": s.kv_heads,
                 "intermediate_size": int(2.6875 * s.text_width), "max_position_embeddings": 8192},
        "fusion": {"method": fusion, "vision_feature_layer": -2,
                   "cross_attention_layers": list(range(3, s.text_layers, 4)) or [s.text_layers - 1]},
    })


def scaling_step_flops(s: Sizes, config, image_tokens: int, batch: int) -> float:
    """FLOPs of a training step on `llava_batch(s, batch, s.text_tokens, True, image_tokens, fusion)`."""
    fusion = config.fusion.method
    text = s.text_tokens + (2 if fusion == "cross" else 1)  # BOS, and Method B's image marker
    in_sequence = image_tokens // HYBRID_TILES if fusion == "hybrid" else image_tokens  # the hybrid's: its thumbnail's
    return training_step_flops(config, batch, in_sequence, text, s.text_tokens)


def fusion_scaling(s: Sizes, compile: bool = False) -> dict[str, Any]:
    """Method A, Method B and the hybrid training step as the image grows, at a fixed text length (tessera only)."""
    from tessera.model import MultimodalLM

    rows = {}
    for n in s.scaling_image_tokens:
        models, steps = {}, {}
        for fusion in FUSIONS:
            config = tessera_config(s, fusion, n)
            torch.manual_seed(0)
            model = MultimodalLM(config).train()
            if compile:
                model.compile()
            optimizer = adamw(model)
            batch = llava_batch(s, s.scaling_batch, s.text_tokens, labelled=True, image_tokens=n, fusion=fusion)
            models[fusion] = (model, config)
            steps[fusion] = (lambda m=model, b=batch, o=optimizer: _train_step(m, b, o, hf=False))
        times = interleaved(steps, s.repeats)
        row = {}
        for fusion, (model, config) in models.items():
            row[fusion] = {"seconds": times[fusion], "flops": scaling_step_flops(s, config, n, s.scaling_batch)}
        row["b_speedup"] = times["unified"] / times["cross"]
        row["hybrid_speedup"] = times["unified"] / times["hybrid"]
        rows[n] = row
        del models, steps
    return rows


def mllama_reference(s: Sizes) -> dict[str, Any]:
    """transformers' Llama 3.2 Vision (Method B) training step at one image size, for reference."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    n = s.mllama_image_tokens
    side = int(round(n**0.5)) * s.patch
    extra = max(1, s.text_layers // 4)  # Mllama's cross-attention layers sit in the stack: every 5th from 3
    cross = [min(3 + 5 * i, s.text_layers + extra - 1) for i in range(extra)]
    config = MllamaConfig(
        vision_config={"image_size": side, "patch_size": s.patch, "hidden_size": s.vision_width,
                       "num_hidden_layers": s.vision_layers, "num_global_layers": 1,
                       "attention_heads": s.vision_heads, "intermediate_size": 4 * s.vision_width,
                       "vision_output_dim": 2 * s.vision_width, "intermediate_layers_indices": [s.vision_layers - 2],
                       "max_num_tiles": 1, "supported_aspect_ratios": [[1, 1]]},
        text_config={"vocab_size": s.vocab, "hidden_size": s.text_width,
                     "num_hidden_layers": s.text_layers + len(cross), "num_attention_heads": s.heads,
                     "num_key_value_heads": s.kv_heads, "intermediate_size": int(2.6875 * s.text_width),
                     "cross_attention_layers": cross, "pad_token_id": 0, "bos_token_id": BOS, "eos_token_id": 2},
        image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config).train()
    optimizer = adamw(model)
    batch = llava_batch(s, s.scaling_batch, s.text_tokens, labelled=True, image_tokens=n, fusion="cross")
    b = s.scaling_batch
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"],
              "pixel_values": batch["pixel_values"].reshape(b, 1, 1, 3, side, side),
              "aspect_ratio_ids": torch.ones(b, 1, dtype=torch.long),
              "aspect_ratio_mask": torch.ones(b, 1, 1, dtype=torch.long),
              "cross_attention_mask": torch.ones(b, batch["input_ids"].shape[1], 1, 1, dtype=torch.long)}
    seconds = interleaved({"mllama": lambda: _train_step(model, inputs, optimizer, hf=True)}, s.repeats)["mllama"]
    return {"image_tokens": n, "seconds": seconds, "cross_attention_layers": cross}


# --- the whole run ------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "fma", "neon", "sve")
    return {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
            "cpu_flags": [f for f in wanted if f in flags.split()], "torch": torch.__version__,
            "python": platform.python_version(), "allocator": allocator()}


def allocator() -> str:
    """How this process allocates memory, as far as the environment says: the training ratio depends on it
    (BENCHMARKS.md, "The memory allocator": keeping freed memory made transformers' step 11% faster, tessera's 3–4%)."""
    preloaded = [lib for lib in os.environ.get("LD_PRELOAD", "").split() if "malloc" in lib or "jemalloc" in lib]
    tuned = sorted(name for name in os.environ if name.startswith("MALLOC_") and name.endswith("_"))
    if not preloaded and not tuned:
        return "the C library's malloc, defaults"
    return ", ".join([*(Path(lib).name for lib in preloaded), *(f"{name}={os.environ[name]}" for name in tuned)])


def run(quick: bool = False, log=print, compile: bool = False) -> dict[str, Any]:
    """compile=True measures tessera with `MultimodalLM.compile()` (torch.compile, inductor); transformers as is."""
    try:
        import transformers
    except ImportError as e:
        raise TesseraError("it measures tessera against transformers, which is not installed in this environment: "
                           "pip install -e '.[bench]'") from e

    s = QUICK if quick else FULL
    started = time.perf_counter()
    log(f"tessera bench ({'quick' if quick else 'full'}): torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads" + (", tessera compiled" if compile else ""))
    first = _log_speeds(matmul_speeds(s), "at the start", log)
    results: dict[str, Any] = {"machine": machine() | {"transformers": transformers.__version__},
                               "sizes": asdict(s), "quick": quick, "linear_backend": linear_backend(),
                               "compile": compile}
    log("  tessera vs transformers (training step, prefill, decode) …")
    results["llava"] = compare_with_transformers(s, compile)
    log("  Method A, Method B and the hybrid as the image grows …")
    results["fusion_scaling"] = fusion_scaling(s, compile)
    log("  transformers Mllama reference …")
    results["mllama_reference"] = mllama_reference(s)
    last = _log_speeds(matmul_speeds(s), "at the end", log)
    # the peak is what the CPU can do; a shared machine's drift only ever lowers a measurement of it, so the better
    # of the two measurements is the peak (a single one taken in a slow moment once gave an MFU above 100%)
    speeds = {kernel: max(first[kernel], last[kernel]) for kernel in first}
    results |= {"matmul_gflops": max(speeds.values()), "matmul_gflops_by_kernel": speeds,
                "matmul_gflops_measured": {"start": first, "end": last}}
    _add_mfu(results, results["matmul_gflops"])
    results["wall_seconds"] = time.perf_counter() - started
    return results


def _log_speeds(speeds: dict[str, float], when: str, log) -> dict[str, float]:
    log(f"  matmul {when}: " + ", ".join(f"{k} {v:.1f}" for k, v in speeds.items()) + " GFLOP/s")
    return speeds


def _add_mfu(results: dict[str, Any], peak: float) -> None:
    """Model FLOPs utilisation of every training step measured: its analytic FLOPs / its time / the peak."""
    train = results["llava"]["train"]
    for name in ("tessera", "transformers"):
        train[name]["mfu"] = _mfu(train["flops"], train[name]["seconds"], peak)
    for row in results["fusion_scaling"].values():
        for fusion in FUSIONS:
            row[fusion]["mfu"] = _mfu(row[fusion]["flops"], row[fusion]["seconds"], peak)


def _mfu(flops: float, seconds: float, peak_gflops: float) -> float:
    return flops / seconds / (peak_gflops * 1e9)
