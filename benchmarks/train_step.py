"""Time the full training step of a preset (PHP by default) at paper size, one precision mode at a time.

    python -m benchmarks.train_step --device cpu --batch_size 8 --steps 3 --modes fp32,bf16 --json out.json
    python -m benchmarks.train_step --device cuda --batch_size 64 --modes fp32,bf16,fp16,compile,half

A step is the trainer's own, `Trainer.train_step` (processor/trainer.py): autocast forward, the sum of every
`*_loss` (PHP: sdm + itc + aux), backward through a GradScaler (active for fp16), gradient clipping when the preset
sets `max_grad_norm`, and the optimizer step (the preset's Adam, fused). It does not wait for the device, so each
timed window ends with a synchronisation. Inputs are synthetic (random images, captions of random length, pids
with repeats so that SDM has positives); the model has random weights (`--arch ViT-B-16`, the paper's backbone
shape).

Modes: `fp32` (no autocast), `bf16` and `fp16` (autocast, fp32 master weights: this project's way), `compile`
(`torch.compile` under the fastest of those three measured in this run, else bf16; `--compile_scope blocks`,
the default, compiles each transformer block of the backbone, so the towers' identical blocks share one
compilation and it finishes in seconds rather than minutes; `model` compiles the whole model), `half` (the
reference's way, for comparison only: every weight `.half()`, no autocast, Adam eps 1e-3).

Each mode runs in a fresh subprocess, so its peak memory is its own: max RSS on the CPU, and
`torch.cuda.max_memory_allocated` on CUDA. After `--warmup` steps, `--repeats` windows of `--steps` steps are
timed; a mode's figure is the median window. `--rounds N` runs the whole list of modes N times, interleaved, and
reports medians over rounds (fairer ratios on a noisy, shared machine). The first mode's process also counts the
model FLOPs of one forward + backward (torch.utils.flop_counter), so the achieved TFLOP/s is printed per mode.

The JSON maps each mode to {"samples_per_s", "peak_mem_gb"} (null with a "note" when a mode failed or is
unsupported on the device), plus per-run details and a "_meta" entry (device, the CPU model and its bf16 / fp16
flags, sizes, FLOPs per sample).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from model.backbone import ARCHITECTURES, build_clip
from processor.precision import cpu_description, describe_cpu
from processor.synthetic import synthetic_setup
from processor.trainer import Trainer
from utils.cli import command

MODES = ("fp32", "bf16", "fp16", "compile", "half")
PRECISION_MODES = ("fp32", "bf16", "fp16")
RESULT_TAG = "RESULT_JSON "


# ----------------------------------------------------------------------------------------------- one mode

def sdpa_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU flash-attention kernel (not in torch's FLOP registry): as for the CUDA kernels."""
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query, key, value)


def sdpa_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out, query, key, value)


def count_flops(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> float:
    """Model FLOPs of one forward + backward, per sample (matmuls, convolutions and attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu_flops
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward] = sdpa_cpu_backward_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        out = model(batch)
        sum(v for k, v in out.items() if k.endswith("_loss")).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch["images"].shape[0]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(args: argparse.Namespace) -> dict:
    """Build the model for `args.worker` (a mode), warm up, time the windows; returns the mode's record."""
    mode, device = args.worker, torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.compile_precision if mode == "compile" else ("fp32" if mode == "half" else mode)
    overrides = {"pretrain_choice": args.arch, "img_size": args.img_size, "text_length": args.text_length,
                 "precision": precision, "grad_checkpointing": args.grad_checkpointing}
    if args.optimizer:
        overrides["optimizer"] = args.optimizer

    def default_attention_backbone(cfg):
        return build_clip(ARCHITECTURES[args.arch], cfg.img_size, cfg.text_length, fused_attention=False)

    cfg, model, batch = synthetic_setup(args.config, overrides, args.batch_size, device,
                                        backbone=default_attention_backbone if args.attention == "default" else None)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    if mode == "half":
        # The reference's approach: every weight in fp16, plain fp16 inputs, no autocast, Adam eps 1e-3.
        model.half()
        batch["images"] = batch["images"].half()
        cfg.optimizer_eps = 1e-3
    model.train()
    record = {"mode": mode, "precision": "fp16 weights" if mode == "half" else precision,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if args.count_flops:
        record["flops_per_sample"] = count_flops(model, batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
    if mode == "compile":
        record["compile_scope"] = args.compile_scope
        cfg.torch_compile = {"model": "full"}.get(args.compile_scope, args.compile_scope)
    trainer = Trainer(cfg, model, device=device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step(batch)
    synchronize(device)
    record["warmup_s"] = round(time.perf_counter() - t0, 2)
    rates, cpu_rates = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            trainer.train_step(batch)
        synchronize(device)
        rates.append(args.batch_size * args.steps / (time.perf_counter() - t0))
        cpu_rates.append(args.batch_size * args.steps / (time.process_time() - c0))
    record["windows_samples_per_s"] = [round(r, 4) for r in rates]
    # Samples per CPU-second of this process: on a shared CPU it moves less with other people's load than
    # wall-clock throughput does (CPU device only; on CUDA it measures the host side).
    record["samples_per_cpu_s"] = statistics.median(cpu_rates)
    record["samples_per_s"] = statistics.median(rates)
    record["peak_mem_gb"] = peak_memory_gb(device)
    return record


# ----------------------------------------------------------------------------------------------- driver

def worker_command(args: argparse.Namespace, mode: str, compile_precision: str, count: bool) -> List[str]:
    cmd = [sys.executable, "-m", "benchmarks.train_step", "--worker", mode, "--compile_precision", compile_precision,
           "--device", args.device, "--batch_size", str(args.batch_size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--arch", args.arch,
           "--img_size", str(args.img_size[0]), str(args.img_size[1]), "--text_length", str(args.text_length),
           "--config", args.config, "--threads", str(args.threads), "--attention", args.attention,
           "--compile_scope", args.compile_scope]
    if args.grad_checkpointing:
        cmd.append("--grad_checkpointing")
    if args.optimizer:
        cmd += ["--optimizer", args.optimizer]
    if count:
        cmd.append("--count_flops")
    return cmd


def run_worker(args: argparse.Namespace, mode: str, compile_precision: str, count: bool) -> dict:
    """Run one mode in a fresh process; a failure or timeout becomes a record with a note instead of a number."""
    cmd = worker_command(args, mode, compile_precision, count)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.mode_timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "note": f"unsupported: no result within {args.mode_timeout} s on this device"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
    # The exception's own line, not the hints some libraries print after it (torch.compile does).
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Unsupported)\b", ln.strip())]
    shown = (errors or lines)[-1][:300] if lines else f"exit code {proc.returncode}"
    return {"mode": mode, "note": f"unsupported: {shown}"}


def median_or_none(values: List[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarise(runs: Dict[str, List[dict]], flops: Optional[float]) -> Dict[str, dict]:
    """Per mode: the medians over rounds, the individual rounds, and the TFLOP/s the median gives."""
    out: Dict[str, dict] = {}
    for mode, records in runs.items():
        rate = median_or_none([r.get("samples_per_s") for r in records])
        cpu_rate = median_or_none([r.get("samples_per_cpu_s") for r in records])
        entry = {"samples_per_s": None if rate is None else round(rate, 4),
                 "peak_mem_gb": median_or_none([r.get("peak_mem_gb") for r in records]),
                 "samples_per_cpu_s": None if cpu_rate is None else round(cpu_rate, 4),
                 "rounds_samples_per_s": [r.get("samples_per_s") for r in records],
                 "precision": records[0].get("precision")}
        if entry["peak_mem_gb"] is not None:
            entry["peak_mem_gb"] = round(entry["peak_mem_gb"], 3)
        if rate is not None and flops:
            entry["tflops"] = round(rate * flops / 1e12, 4)
        notes = [r["note"] for r in records if "note" in r]
        if notes:
            entry["note"] = notes[0]
        out[mode] = entry
    return out


def print_table(summary: Dict[str, dict], meta: dict) -> None:
    print(f"device {meta['device_name']}; batch {meta['batch_size']}, {meta['arch']} at "
          f"{meta['img_size'][0]}x{meta['img_size'][1]}, text {meta['text_length']}, {meta['attention']} attention; "
          f"median over {meta['rounds']} round(s) x {meta['repeats']} window(s) of {meta['steps']} step(s)")
    if meta.get("flops_per_sample"):
        print(f"model FLOPs per sample (forward + backward): {meta['flops_per_sample'] / 1e9:.1f} GFLOP")
    base = summary.get("fp32", {}).get("samples_per_s")
    base_cpu = summary.get("fp32", {}).get("samples_per_cpu_s")
    cpu = meta["device"] == "cpu"
    print(f"{'mode':<8} {'samples/s':>10} {'vs fp32':>8} {'peak GB':>8} {'TFLOP/s':>8}"
          + (f" {'samples/CPU-s':>14} {'vs fp32':>8}" if cpu else ""))
    for mode, e in summary.items():
        if e["samples_per_s"] is None:
            print(f"{mode:<8} {e.get('note', 'no result')}")
            continue
        ratio = f"{e['samples_per_s'] / base:.2f}x" if base else "-"
        tflops = f"{e['tflops']:.3f}" if "tflops" in e else "-"
        line = f"{mode:<8} {e['samples_per_s']:>10.3f} {ratio:>8} {e['peak_mem_gb']:>8.2f} {tflops:>8}"
        if cpu:
            cpu_ratio = f"{e['samples_per_cpu_s'] / base_cpu:.2f}x" if base_cpu else "-"
            line += f" {e['samples_per_cpu_s']:>14.3f} {cpu_ratio:>8}"
        print(line)


def device_name(device: str, threads: int) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    # The flags decide what bf16 can gain on a CPU (AVX-512 BF16, AMX), so every figure carries them.
    return f"CPU {describe_cpu()}, {threads or torch.get_num_threads()} threads"


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = command("python -m benchmarks.train_step", __doc__.split("\n")[0], options=False)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile mode: at least 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per process; the median is kept")
    p.add_argument("--rounds", type=int, default=1, help="times the whole list of modes is run, interleaved")
    p.add_argument("--modes", default="fp32,bf16", help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--arch", default="ViT-B-16", help="random-weight backbone (model/backbone.py ARCHITECTURES)")
    p.add_argument("--img_size", type=int, nargs=2, default=[384, 128], metavar=("H", "W"))
    p.add_argument("--text_length", type=int, default=77)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "php_cuhk.yaml"), help="preset to time")
    p.add_argument("--optimizer", default="", help="override the preset's optimizer")
    p.add_argument("--attention", default="fused", choices=("fused", "default"),
                   help="backbone blocks: fused (the project's) or default (nn.MultiheadAttention, for comparison)")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute backbone activations")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per mode process (default: torch's)")
    p.add_argument("--compile_precision", default="", help="precision of 'compile' (default: fastest measured)")
    p.add_argument("--compile_scope", default="blocks", choices=("blocks", "model"),
                   help="'compile' mode: each backbone block (regional) or the whole model")
    p.add_argument("--mode_timeout", type=int, default=1800, help="seconds before a mode counts as unsupported")
    p.add_argument("--no_flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--count_flops", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        p.error(f"--modes: unknown {unknown} (expected a comma-separated list from {', '.join(MODES)})")
    if args.arch not in ARCHITECTURES:
        p.error(f"--arch {args.arch}: expected one of {', '.join(ARCHITECTURES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available")
    args.mode_list = modes
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    if args.worker:
        print(RESULT_TAG + json.dumps(run_mode(args)), flush=True)
        return 0
    runs: Dict[str, List[dict]] = {m: [] for m in args.mode_list}
    flops = None
    device = device_name(args.device, args.threads)
    print(f"device {device}", flush=True)
    for round_index in range(args.rounds):
        for mode in args.mode_list:
            compile_precision = args.compile_precision or "bf16"
            if mode == "compile" and not args.compile_precision:
                measured = {m: median_or_none([r.get("samples_per_s") for r in runs.get(m, [])])
                            for m in PRECISION_MODES}
                measured = {m: v for m, v in measured.items() if v is not None}
                if measured:
                    compile_precision = max(measured, key=measured.get)
            record = run_worker(args, mode, compile_precision, count=flops is None and not args.no_flops)
            flops = flops or record.get("flops_per_sample")
            runs[mode].append(record)
            rate = record.get("samples_per_s")
            shown = f"{rate:.3f} samples/s, peak {record['peak_mem_gb']:.2f} GB" if rate else record.get("note")
            print(f"round {round_index + 1}/{args.rounds} {mode}: {shown} ({device})", flush=True)
    meta = {"device": args.device, "device_name": device, "cpu": cpu_description(),
            "batch_size": args.batch_size,
            "arch": args.arch, "img_size": args.img_size, "text_length": args.text_length, "steps": args.steps,
            "repeats": args.repeats, "rounds": args.rounds, "warmup": args.warmup, "config": args.config,
            "grad_checkpointing": args.grad_checkpointing, "attention": args.attention,
            "threads": args.threads or torch.get_num_threads(),
            "flops_per_sample": flops, "torch": torch.__version__}
    summary = summarise(runs, flops)
    print_table(summary, meta)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({**summary, "_meta": meta, "_runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
