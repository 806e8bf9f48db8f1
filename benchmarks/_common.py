"""Shared machinery of the model benchmarks: identical-weight models, interleaved timing, FLOPs, reports.

Every speed claim compares hf_clip with the reference libraries in ONE process, on the SAME weights and
inputs: an open_clip model with random weights (built under its `-quickgelu` name, the activation of
OpenAI's weights) is converted in memory into hf_clip and, for ViTs, into transformers' `CLIPModel`.
Repetitions alternate between the implementations (rotating who goes first), so a loaded or throttling
machine slows all of them alike. Wall time and process CPU time are both recorded: on a shared machine
the CPU time is the steadier of the two.

The scripts are run from the repository root (`python benchmarks/bench_inference.py`); Python then puts
benchmarks/ on the import path, which is how they find this module.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODEL_NAMES = ("ViT-B-32", "ViT-B-16", "RN50")  # open_clip spellings; "-quickgelu" is appended
IMPLEMENTATIONS = ("hf_clip", "open_clip", "transformers")
DTYPES = ("fp32", "bf16")
CONTEXT_LENGTH = 77


# ----------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu.")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: only cpu and cuda are supported.")
    return device


def machine_info(device: torch.device) -> dict[str, Any]:
    """What a reader needs to reproduce or discount a figure: hardware, load, library versions."""
    import open_clip
    import transformers

    info: dict[str, Any] = {
        "device": device.type,
        "cpu_model": cpu_model(),
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "open_clip": open_clip.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fingerprint(info: Mapping[str, Any]) -> tuple:
    """The hardware part of `machine_info`: results measured under the same fingerprint are comparable."""
    return (
        info.get("device"),
        info.get("cpu_model"),
        info.get("nproc"),
        info.get("torch_threads"),
        info.get("gpu"),
    )


# ----------------------------------------------------------------------------------------------- timing


@dataclass
class Samples:
    """Per-repetition seconds of one runner (one call each, or the mean of `inner` calls)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    calls_per_rep: int = 1

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    def __add__(self, other: Samples) -> Samples:
        """Repetition-wise sum: the time of doing both things in the same repetition."""
        return Samples(
            [a + b for a, b in zip(self.wall, other.wall, strict=True)],
            [a + b for a, b in zip(self.cpu, other.cpu, strict=True)],
            self.calls_per_rep,
        )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, inner: int = 1) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of `fn`, averaged over `inner` back-to-back calls.

    Process CPU time counts every thread of this process, so with N busy threads it approaches N x wall;
    it excludes time stolen by other processes, which wall time does not.
    """
    synchronize(device)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(inner):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall0) / inner, (time.process_time() - cpu0) / inner


def interleaved(
    runners: Mapping[Hashable, Callable[[], object]],
    device: torch.device,
    warmup: int = 1,
    repeats: int = 5,
    inner: int = 1,
    desc: str = "",
    min_rep_seconds: float = 0.0,
    probes: Mapping[Hashable, Callable[[], object]] | None = None,
) -> dict[Hashable, Samples]:
    """Run every runner once per repetition, rotating the order, after `warmup` untimed rounds.

    Each timed repetition makes `inner` calls, raised for all runners alike until the slowest one's
    repetition lasts `min_rep_seconds` (as timed in the last warm-up round): fast calls are otherwise
    at the mercy of a single scheduler hiccup. `probes` (e.g. `gemm_probe`) join the rotation with one
    call per repetition; their samples are returned alongside.
    """
    names = list(runners)
    slowest = 0.0
    for _ in range(warmup):
        slowest = max(time_call(runners[name], device)[0] for name in names)
        for probe in (probes or {}).values():
            probe()
    if warmup and min_rep_seconds > 0 and slowest > 0:
        inner = max(inner, math.ceil(min_rep_seconds / slowest))
    calls = {name: inner for name in names} | {name: 1 for name in probes or {}}
    everything = {**runners, **(probes or {})}
    order = list(everything)
    samples = {name: Samples(calls_per_rep=calls[name]) for name in order}
    for rep in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        shift = rep % len(order)
        for name in order[shift:] + order[:shift]:
            wall, cpu = time_call(everything[name], device, calls[name])
            samples[name].wall.append(wall)
            samples[name].cpu.append(cpu)
    return samples


def _machine_busy_seconds() -> float | None:
    """CPU-seconds all processes (and the hypervisor, as steal) have used since boot, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class ContentionMeter:
    """How much of the machine OTHER processes used while a block ran: the share of all cores' time that
    was busy but not ours (0: we had the machine to ourselves; 0.5 on 2 cores: another job held one core).

    With several compute threads this matters more than the share suggests: a parallel region waits for
    its slowest thread, so one descheduled thread stalls all of them.
    """

    def __enter__(self) -> ContentionMeter:
        self.others_share: float | None = None
        self._start = (time.perf_counter(), time.process_time(), _machine_busy_seconds())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, cpu0, busy0 = self._start
        busy1 = _machine_busy_seconds()
        if busy0 is None or busy1 is None:
            return
        wall, own = time.perf_counter() - wall0, time.process_time() - cpu0
        self.others_share = max(0.0, (busy1 - busy0 - own) / (wall * (os.cpu_count() or 1)))


def set_threads(threads: int | None) -> None:
    """Pin torch's intra-op threads (default: torch's choice, one per core)."""
    if threads is not None:
        if threads < 1:
            raise SystemExit("--threads must be at least 1.")
        torch.set_num_threads(threads)


def autocast(device: torch.device, dtype: str) -> AbstractContextManager:
    """bf16 autocast (weights stay fp32, matmuls run in bf16) or nothing for fp32."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; use one of {DTYPES}.")
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()


# ----------------------------------------------------------------------------------------------- models


@dataclass
class ModelSet:
    """One architecture in every implementation, all holding the same weights."""

    name: str
    config: Any  # HfClipConfig
    models: dict[str, nn.Module]

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def tower(self) -> str:
        return "resnet" if self.config.vision_config.vision_type == "resnet" else "vit"

    def cast(self, dtype: torch.dtype) -> ModelSet:
        """Copies of every implementation with weights in `dtype`, made the same way one after another."""
        return ModelSet(
            self.name, self.config, {k: copy.deepcopy(m).to(dtype) for k, m in self.models.items()}
        )


def _check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise SystemExit(f"Unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}.")


def create_open_clip(name: str) -> nn.Module:
    """A randomly initialised open_clip CLIP with QuickGELU (no download: pretrained=None)."""
    import open_clip

    _check_model_name(name)
    logging.disable(logging.WARNING)  # open_clip warns that no pretrained weights were loaded
    try:
        return open_clip.create_model(f"{name}-quickgelu", pretrained=None)
    finally:
        logging.disable(logging.NOTSET)


def _load_transformers(config: Any, hf_state: Mapping[str, torch.Tensor]) -> nn.Module:
    from transformers import CLIPModel
    from transformers.initialization import no_init_weights

    from hf_clip.convert.rules import invert_rules
    from hf_clip.convert.transformers import config_to_transformers, transformers_rules

    with no_init_weights():
        model = CLIPModel(config_to_transformers(config))
    model.load_state_dict(invert_rules(hf_state, transformers_rules(config)), strict=True)
    return model


def build_model_set(name: str, device: torch.device, seed: int = 0, transformers: bool = True) -> ModelSet:
    """open_clip random weights, converted in memory into hf_clip (and transformers for ViTs)."""
    from transformers.initialization import no_init_weights

    from hf_clip import HfClipModel
    from hf_clip.convert import infer_openai_config
    from hf_clip.convert.openai import OPENAI_EXTRA_KEYS, openai_rules
    from hf_clip.convert.rules import apply_rules

    torch.manual_seed(seed)
    reference = create_open_clip(name)
    state = reference.state_dict()
    config = infer_openai_config(state, "quick_gelu")
    hf_state = apply_rules(state, openai_rules(config), OPENAI_EXTRA_KEYS, f"open_clip {name}")
    with no_init_weights():
        ours = HfClipModel(config)
    ours.load_state_dict(hf_state, strict=True)
    models = {"hf_clip": ours, "open_clip": reference}
    if transformers and config.vision_config.vision_type == "vit":
        models["transformers"] = _load_transformers(config, hf_state)
    # Each implementation then gets a fresh copy of its weights, made the same way, one after another. The
    # models as first built came out of different allocation histories and, on the 2-core VM, ran up to
    # 1.5x slower than copies of themselves at batch 1 (hf_clip's ViT-B/32 image tower 97.8-109.6 ms
    # against 68.0-73.5; open_clip's once 80.6 against 67.3): whichever was built last was favoured.
    fresh = {}
    for impl in list(models):
        fresh[impl] = copy.deepcopy(models.pop(impl).to(device).eval())
    return ModelSet(name, config, fresh)


def compile_blocks(model: nn.Module) -> int:
    """Regional compilation, the same rule for every library: each child of a ModuleList or Sequential
    whose children share one class (transformer layers, ResNet bottlenecks) is compiled in place, with
    static shapes. Identical layers reuse one compiled graph, so this compiles in a fraction of the time a
    whole-model graph takes, and code between the blocks (hf_clip's caption trimming) stays eager.
    Returns the number of blocks compiled."""
    count = 0
    for module in model.modules():
        children = list(module.children())
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(children) > 1:
            if len({type(child) for child in children}) == 1:
                for child in children:
                    child.compile(dynamic=False)
                count += len(children)
    if not count:
        raise ValueError(f"{type(model).__name__} has no repeated blocks to compile.")
    return count


def image_encoder(impl: str, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each library's public call for projected, unnormalised image embeddings."""
    if impl == "hf_clip":
        return model.get_image_features
    if impl == "open_clip":
        return model.encode_image
    return lambda pixels: model.get_image_features(pixel_values=pixels).pooler_output


def text_encoder(impl: str, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Each library's public call for projected, unnormalised text embeddings, on the ids its own tokenizer
    hands it for these captions: open_clip's tokenizer pads to 77 and its towers take nothing else;
    transformers' processor pads to the batch's longest caption (`padding=True`, as its documentation
    shows), so it gets those; hf_clip takes 77-padded ids and trims them itself."""
    if impl == "hf_clip":
        return model.get_text_features
    if impl == "open_clip":
        return model.encode_text
    eos = model.config.text_config.eos_token_id
    return lambda ids: model.get_text_features(input_ids=longest_padded(ids, eos)).pooler_output


def longest_padded(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """77-padded ids cut to the batch's longest caption: what a tokenizer with padding=True returns."""
    return ids[:, : text_positions_run(ids, eos_token_id)]


def make_inputs(
    batch: int, image_size: int, vocab_size: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian pixels and captions of 5-40 random tokens framed by start/end-of-text, padded with 0."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    ids = torch.zeros(batch, CONTEXT_LENGTH, dtype=torch.long)
    lengths = torch.randint(5, 41, (batch,), generator=generator).tolist()
    for row, length in enumerate(lengths):
        ids[row, 0] = vocab_size - 2
        ids[row, 1 : length + 1] = torch.randint(1, vocab_size - 2, (length,), generator=generator)
        ids[row, length + 1] = vocab_size - 1
    return pixels.to(device), ids.to(device)


def text_positions_run(ids: torch.Tensor, eos_token_id: int) -> int:
    """Positions hf_clip's text tower runs for this batch: up to the last first-end-of-text token (it trims
    the rest, which cannot reach the embedding); the references run all of them."""
    from hf_clip.modeling_hf_clip import TrimLength, _eos_index

    return TrimLength(_eos_index(ids, eos_token_id)).get()


def meta_hf_clip(config: Any) -> nn.Module:
    """A weightless hf_clip model: FLOP counting needs shapes only (and on meta SDPA decomposes into
    matmuls the counter sees, which the fused CPU kernel hides from it)."""
    from hf_clip import HfClipModel

    with torch.device("meta"):
        return HfClipModel(config)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of matmuls, convolutions and attention in `fn` (forward and any backward it runs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


# ------------------------------------------------------------------------------------------ matmul peak


def gemm(device: torch.device, dtype: str, n: int) -> Callable[[], object]:
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=torch_dtype)
    b = torch.randn(n, n, device=device, dtype=torch_dtype)
    out = torch.empty(n, n, device=device, dtype=torch_dtype)
    return lambda: torch.mm(a, b, out=out)


def measure_matmul_peak(
    device: torch.device,
    sizes: Sequence[int],
    dtypes: Sequence[str] = DTYPES,
    repeats: int = 5,
    inner: int = 1,
    desc: str = "matmul",
) -> dict[str, Any]:
    """Median GEMM FLOP/s per (dtype, size); a dtype's peak is its best size."""
    runners = {(dtype, n): gemm(device, dtype, n) for dtype in dtypes for n in sizes}
    samples = interleaved(runners, device, 1, repeats, inner, desc)
    by_size: dict[str, dict[str, Any]] = {dtype: {} for dtype in dtypes}
    for (dtype, n), sample in samples.items():
        by_size[dtype][str(n)] = {"flops_per_s": 2 * n**3 / sample.wall_median, **vars(sample)}
    peak = {dtype: max(e["flops_per_s"] for e in by_size[dtype].values()) for dtype in dtypes}
    return {"peak_flops_per_s": peak, "by_size": by_size}


def matmul_peak_path(results_dir: Path, device: torch.device) -> Path:
    """One file per device kind; CPU runs with a non-default thread count get their own."""
    threads = torch.get_num_threads()
    tag = f"_t{threads}" if device.type == "cpu" and threads != os.cpu_count() else ""
    return results_dir / f"matmul_peak_{device.type}{tag}.json"


def load_matmul_peak(results_dir: Path, device: torch.device, info: Mapping[str, Any]) -> dict[str, Any]:
    """{"source": file, dtype: FLOP/s} from bench_matmul_peak.py on this hardware, or {} if there is none."""
    path = matmul_peak_path(results_dir, device)
    if path.is_file():
        saved = json.loads(path.read_text())
        if "peak_flops_per_s" in saved and fingerprint(saved["machine"]) == fingerprint(info):
            return {"source": path.name, **saved["peak_flops_per_s"]}
    print(f"(no {path.name} from this machine: % of peak uses the in-run GEMM probe only)")
    return {}


PROBE = "gemm probe"


def gemm_probe(device: torch.device, dtype: str) -> tuple[dict[str, Callable[[], object]], int]:
    """A square GEMM (n=4096 on CPU, 8192 on GPU: at the top of bench_matmul_peak's curve) to time in
    the same interleaved rounds as the models, so "% of peak" compares rates measured under the same
    machine load. Returns ({PROBE: runner}, FLOPs per call)."""
    n = 4096 if device.type == "cpu" else 8192
    return {PROBE: gemm(device, dtype, n)}, 2 * n**3


def pct_of_peak(flops_per_s: float, probe_flops_per_s: float, saved: Mapping[str, Any], dtype: str) -> dict:
    """Achieved FLOP/s as a share of the in-run GEMM probe and of the saved bench_matmul_peak.py peak."""
    shares = {"pct_peak": 100 * flops_per_s / probe_flops_per_s}
    if dtype in saved:
        shares["pct_saved_peak"] = 100 * flops_per_s / saved[dtype]
    return shares


# ---------------------------------------------------------------------------------------------- reports


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a crash never leaves a truncated results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def results_path(results_dir: Path, stem: str, device: torch.device, quick: bool, suffix: str) -> Path:
    return results_dir / f"{stem}_{device.type}{'_quick' if quick else ''}.{suffix}"


def save_results(
    stem: str,
    args: Any,
    device: torch.device,
    info: dict[str, Any],
    peak: Mapping[str, Any],
    extra: Mapping[str, Any],
    write_chart: Callable[[dict[str, Any], Path], None],
) -> None:
    """Print the machine line, then write results/<stem>_<device>[_quick].json (atomically) and its chart."""
    info["loadavg_end"] = list(os.getloadavg())
    print(
        f"machine: {info['cpu_model']}, nproc {info['nproc']}, threads {info['torch_threads']}, "
        f"load average {info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}"
    )
    options = {k: v for k, v in vars(args).items() if k != "results_dir"}
    data = {"machine": info, "matmul_peak": peak, "options": options, **extra}
    json_path = results_path(args.results_dir, stem, device, args.quick, "json")
    write_json(json_path, data)
    write_chart(data, json_path.with_suffix(".png"))
    print(f"wrote {json_path} and {json_path.with_suffix('.png').name}")


def rate_cells(per_impl: Mapping[str, Any], key: str) -> list[str]:
    """One table cell per implementation (hf_clip, open_clip, transformers), "-" where it did not run."""
    return [f"{per_impl[impl][key]:.2f}" if impl in per_impl else "-" for impl in IMPLEMENTATIONS]


def pct_cell(entry: Mapping[str, Any]) -> str:
    """ "% of the in-run GEMM probe (% of the saved bench_matmul_peak.py peak)"."""
    pct = f"{entry['pct_peak']:.0f}%"
    return pct + (f" ({entry['pct_saved_peak']:.0f}%)" if "pct_saved_peak" in entry else "")


def chart_labels(data: Mapping[str, Any]) -> tuple[list[str], str]:
    """Bar-group labels (model, dtype, batch) and the machine line of a results file's chart."""
    groups = [f"{r['model']}\n{r['dtype']} b{r['batch']}" for r in data["results"]]
    info = data["machine"]
    return groups, f"{info.get('gpu') or info['cpu_model']}, {info['torch_threads']} threads"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio_chart(
    path: Path, title: str, groups: Sequence[str], series: Mapping[str, Sequence[float]], target: float
) -> None:
    """Grouped bars of hf_clip / best-reference ratios, with parity (1.0) and the target marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(1, len(series))
    top = min(2.0, max(1.05 * target, 1.1 * max(max(values) for values in series.values())))
    fig, ax = plt.subplots(figsize=(max(7.0, min(16.0, 1.0 + 1.1 * len(groups))), 4.5))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [min(v, top) for v in values], width, label=label)
        ax.bar_label(
            bars, labels=[f"{v:.2f}" + ("^" if v > top else "") for v in values], fontsize=7, padding=1
        )
    ax.set_ylim(0.5, top * 1.05)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(target, color="tab:red", linestyle="--", linewidth=0.8, label=f"target {target:.2f}x")
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("hf_clip vs best reference (>1: hf_clip better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
