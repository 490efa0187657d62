"""Storage benchmark: compression of a trained model's state, the local disk, and the bytes
a MiniCPM-V-shaped fine-tune writes with ckptwise against the ``Trainer``'s own checkpoints.

    python -m bench.storage [--json PATH] [--tmpdir DIR] [--train-steps N]

Everything is measured side by side in one run on this machine and printed as one plain-text
table of ratios; ``--json`` also writes the figures. Nothing is downloaded: the language
model is built from a config and trained here on synthetic tokens for a few dozen AdamW
steps, so that its weights and Adam moments are those of a model that trained.

Sections:

1. the trained LM's state (bf16 weights, fp32 weights, fp32 Adam moments): raw bytes, our
   ``bytegroup`` codec, plain zstd level 3 (the ``zstd`` codec), and the order-0 per-plane
   byte-entropy bound; ``bytegroup``'s single-thread encode and decode rates, each the
   median of 3, with a bit-exact round trip checked;
2. the disk under ``--tmpdir``: ``os.write`` + ``os.fsync`` rate, and whether compressing
   would have made a synchronous save faster here (the call ``codec="auto"`` makes);
3. ``examples/finetune_minicpmv.py`` with 10 saves, everything kept, with ckptwise and with
   the ``Trainer``'s own checkpoints; then the same model under LoRA (``bench.lora_minicpmv``);
4. the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
import zstandard
from transformers import LlamaConfig, LlamaForCausalLM

from ckptwise.store.codecs import CODECS
from ckptwise.store.layout import tensor_bytes
from ckptwise.store.planner import CodecPlanner

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
REPEATS = 3
MB = 1e6

#: (minimum raw/ours, minimum % fewer bytes than zstd-3) per group that has a target
TARGETS: dict[str, tuple[float, float]] = {
    "bf16 weights": (1.4, 10.0),
    "fp32 weights": (1.15, 8.0),
}
FULL_RATIO_TARGET = 1 / 3
LORA_RATIO_TARGET = 1 / 10


# -- helpers ---------------------------------------------------------------------------------


def _median_time(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextmanager
def _section(name: str, timings: dict[str, float]) -> Iterator[None]:
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    print(f"[bench] {name}: {timings[name]:.1f} s", file=sys.stderr, flush=True)


def _mb(n: float) -> str:
    return f"{n / MB:.2f}"


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _table(
    header: list[str], rows: list[list[str]], *, left: frozenset[int] = frozenset({0})
) -> str:
    """Columns in ``left`` are left-aligned, the others (figures) right-aligned."""
    if not rows:
        return "  (skipped)"
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    indent = "  "

    def line(cells: list[str]) -> str:
        parts = [
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return indent + "  ".join(parts).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# -- 1. a trained model's state ----------------------------------------------------------------


@dataclass
class LMSetup:
    hidden: int = 512
    layers: int = 6
    heads: int = 8
    intermediate: int = 2048
    vocab: int = 8000
    seq: int = 64
    batch: int = 8
    steps: int = 40
    lr: float = 5e-4
    weight_decay: float = 0.1
    seed: int = 0
    params: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _markov_tokens(setup: LMSetup, generator: torch.Generator, rows: int) -> torch.Tensor:
    """Token sequences from a sparse random Markov chain (8 successors per token, drawn from a
    Zipf law, as is the 15 % fallback): text-like statistics, of which a small LM learns the
    unigram part in a few dozen steps."""
    vocab = setup.vocab
    zipf = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    successors = torch.multinomial(zipf, vocab * 8, replacement=True, generator=generator)
    successors = successors.view(vocab, 8)
    tokens = torch.empty(rows, setup.seq, dtype=torch.long)
    tokens[:, 0] = torch.multinomial(zipf, rows, replacement=True, generator=generator)
    for t in range(1, setup.seq):
        pick = torch.randint(0, 8, (rows,), generator=generator)
        follow = successors[tokens[:, t - 1], pick]
        jump = torch.multinomial(zipf, rows, replacement=True, generator=generator)
        keep = torch.rand(rows, generator=generator) < 0.85
        tokens[:, t] = torch.where(keep, follow, jump)
    return tokens


def train_lm(setup: LMSetup) -> tuple[LlamaForCausalLM, torch.optim.AdamW]:
    """A Llama-shaped LM built from a config and trained ``setup.steps`` AdamW steps."""
    torch.manual_seed(setup.seed)
    config = LlamaConfig(
        vocab_size=setup.vocab,
        hidden_size=setup.hidden,
        intermediate_size=setup.intermediate,
        num_hidden_layers=setup.layers,
        num_attention_heads=setup.heads,
        num_key_value_heads=setup.heads,
        max_position_embeddings=setup.seq * 2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    setup.params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=setup.lr, weight_decay=setup.weight_decay, betas=(0.9, 0.95)
    )
    generator = torch.Generator().manual_seed(setup.seed + 1)
    data = _markov_tokens(setup, generator, rows=setup.batch * setup.steps)
    model.train()
    start = time.perf_counter()
    for step in range(setup.steps):
        batch = data[step * setup.batch : (step + 1) * setup.batch]
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        setup.losses.append(float(loss.detach()))
    setup.seconds = time.perf_counter() - start
    return model, optimizer


def state_groups(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, list[torch.Tensor]]:
    """The tensors of each measured group, one entry per tensor (as the store saves them)."""
    weights = [t.detach().contiguous() for t in model.state_dict().values()]
    moments = [optimizer.state[p] for p in model.parameters() if p in optimizer.state]
    exp_avg = [s["exp_avg"].contiguous() for s in moments]
    exp_avg_sq = [s["exp_avg_sq"].contiguous() for s in moments]
    return {
        "bf16 weights": [t.to(torch.bfloat16) for t in weights],
        "fp32 weights": [t.float() for t in weights],
        "fp32 Adam exp_avg": exp_avg,
        "fp32 Adam exp_avg_sq": exp_avg_sq,
    }


def plane_entropy_bits(raw: memoryview, itemsize: int) -> float:
    """Sum over byte planes of (Shannon entropy of the plane's byte histogram x its length)."""
    elements = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    bits = 0.0
    for i in range(itemsize):
        counts = np.bincount(elements[:, i], minlength=256).astype(np.float64)
        counts = counts[counts > 0]
        n = counts.sum()
        bits += float(-(counts * np.log2(counts / n)).sum())
    return bits


@dataclass
class GroupResult:
    name: str
    tensors: int
    itemsize: int
    raw: int
    ours: int
    zstd3: int
    bound_bits: float
    encode_s: float
    decode_s: float
    zstd3_encode_s: float
    roundtrip_exact: bool

    @property
    def ratio_ours(self) -> float:
        return self.raw / self.ours

    @property
    def ratio_zstd3(self) -> float:
        return self.raw / self.zstd3

    @property
    def ratio_bound(self) -> float:
        return self.raw * 8 / self.bound_bits

    @property
    def fewer_than_zstd3(self) -> float:
        return 100.0 * (1 - self.ours / self.zstd3)

    def target(self) -> tuple[str, bool | None]:
        if self.name not in TARGETS:
            return "", None
        ratio, fewer = TARGETS[self.name]
        met = self.ratio_ours >= ratio and self.fewer_than_zstd3 >= fewer
        return f">={ratio:.2f}x & >={fewer:.0f}% fewer", met

    def figures(self) -> dict[str, Any]:
        text, met = self.target()
        return {
            **asdict(self),
            "ratio_ours": self.ratio_ours,
            "ratio_zstd3": self.ratio_zstd3,
            "ratio_bound": self.ratio_bound,
            "percent_fewer_than_zstd3": self.fewer_than_zstd3,
            "encode_MBps": self.raw / self.encode_s / MB,
            "decode_MBps": self.raw / self.decode_s / MB,
            "zstd3_encode_MBps": self.raw / self.zstd3_encode_s / MB,
            "target": text or None,
            "target_met": met,
        }


def measure_group(name: str, tensors: list[torch.Tensor]) -> tuple[GroupResult, list[bytes]]:
    """Sizes, entropy bound, and single-thread encode/decode rates of one group."""
    ours_codec, zstd_codec = CODECS["bytegroup"], CODECS["zstd"]
    views = [tensor_bytes(t) for t in tensors]
    sizes = [t.element_size() for t in tensors]
    itemsize = sizes[0]
    raw = sum(len(v) for v in views)

    encoded: list[bytes] = []

    def encode() -> None:
        encoded[:] = [
            bytes(ours_codec.encode(v, itemsize=s)) for v, s in zip(views, sizes, strict=True)
        ]

    encode_s = _median_time(encode)
    outs = [bytearray(len(v)) for v in views]

    def decode() -> None:
        for data, out, s in zip(encoded, outs, sizes, strict=True):
            ours_codec.decode(data, memoryview(out), itemsize=s)

    decode_s = _median_time(decode)
    exact = all(bytes(v) == bytes(o) for v, o in zip(views, outs, strict=True))
    assert exact, f"{name}: bytegroup did not round-trip bit-exactly"
    outs.clear()  # free the copies before the next measurement

    zstd_sizes: list[int] = []

    def zstd3() -> None:
        zstd_sizes[:] = [
            len(zstd_codec.encode(v, itemsize=s)) for v, s in zip(views, sizes, strict=True)
        ]

    zstd3_s = _median_time(zstd3)
    bound = sum(plane_entropy_bits(v, s) for v, s in zip(views, sizes, strict=True))
    result = GroupResult(
        name=name,
        tensors=len(tensors),
        itemsize=itemsize,
        raw=raw,
        ours=sum(len(e) for e in encoded),
        zstd3=sum(zstd_sizes),
        bound_bits=bound,
        encode_s=encode_s,
        decode_s=decode_s,
        zstd3_encode_s=zstd3_s,
        roundtrip_exact=exact,
    )
    return result, encoded


def combine(name: str, parts: list[GroupResult]) -> GroupResult:
    """Several measured groups as one (sizes, bits and seconds add up)."""
    return GroupResult(
        name=name,
        tensors=sum(p.tensors for p in parts),
        itemsize=parts[0].itemsize,
        raw=sum(p.raw for p in parts),
        ours=sum(p.ours for p in parts),
        zstd3=sum(p.zstd3 for p in parts),
        bound_bits=sum(p.bound_bits for p in parts),
        encode_s=sum(p.encode_s for p in parts),
        decode_s=sum(p.decode_s for p in parts),
        zstd3_encode_s=sum(p.zstd3_encode_s for p in parts),
        roundtrip_exact=all(p.roundtrip_exact for p in parts),
    )


# -- 2. the disk -------------------------------------------------------------------------------


def fsync_write_seconds(folder: Path, chunks: list[bytes | memoryview]) -> float:
    """Median seconds to write ``chunks`` to a new file with ``os.write`` and ``os.fsync``."""
    times = []
    for i in range(REPEATS):
        path = folder / f"write-{i}.bin"
        start = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        times.append(time.perf_counter() - start)
        path.unlink()
    return statistics.median(times)


# -- 3. the MiniCPM-V-shaped runs --------------------------------------------------------------


def _run(cmd: list[str], summary: Path) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    doc: dict[str, Any] = json.loads(summary.read_text())
    return doc


def files_bytes(output_dir: Path, mode: str) -> int:
    """Bytes of every file a run's checkpoints left: the ckptwise run folder (objects,
    manifests, run state) or the Trainer's ``checkpoint-N`` folders."""
    roots = (
        [output_dir / "ckptwise"] if mode == "ckptwise" else list(output_dir.glob("checkpoint-*"))
    )
    return sum(p.stat().st_size for root in roots for p in root.rglob("*") if p.is_file())


def minicpmv_full(work: Path) -> dict[str, Any]:
    """``examples/finetune_minicpmv.py``, 50 steps, saves every 5, with and without ckptwise."""
    common = [
        "--max_steps", "50", "--save_steps", "5", "--eval_strategy", "no",
        "--logging_steps", "1", "--per_device_train_batch_size", "8", "--disable_tqdm", "true",
    ]  # fmt: skip
    script = str(ROOT / "examples" / "finetune_minicpmv.py")
    runs: dict[str, Any] = {}
    for label, extra in (
        ("ckptwise", ["--ckptwise_save", "every(5)", "--ckptwise_keep", "all"]),
        ("trainer", ["--use_ckptwise", "false"]),
    ):
        out, summary = work / f"full-{label}", work / f"full-{label}.json"
        cmd = [sys.executable, script, "--output_dir", str(out), *common, *extra]
        runs[label] = _run([*cmd, "--summary_file", str(summary)], summary)
        runs[label]["files_bytes"] = files_bytes(out, label)
    return runs


def minicpmv_lora(work: Path) -> dict[str, Any]:
    """``bench.lora_minicpmv``: the Trainer's own saves, ckptwise with all weights, and (for
    reference) ckptwise with the trainable weights only."""
    runs: dict[str, Any] = {}
    for label, extra in (
        ("trainer", ["--mode", "trainer"]),
        ("ckptwise", ["--mode", "ckptwise", "--weights", "all"]),
        ("ckptwise_trainable", ["--mode", "ckptwise", "--weights", "trainable"]),
    ):
        out, summary = work / f"lora-{label}", work / f"lora-{label}.json"
        cmd = [sys.executable, "-m", "bench.lora_minicpmv", *extra, "--output_dir", str(out)]
        runs[label] = _run([*cmd, "--summary_file", str(summary)], summary)
        runs[label]["files_bytes"] = files_bytes(out, label.split("_")[0])
    return runs


# -- 4. the machine ----------------------------------------------------------------------------


def machine(folder: Path) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    disk: dict[str, str] = {}
    try:
        df = (
            subprocess.run(
                ["df", "-PT", "-B1", str(folder)], capture_output=True, text=True, check=True
            )
            .stdout.splitlines()[-1]
            .split()
        )
        disk = {
            "device": df[0],
            "type": df[1],
            "size": _fmt_bytes(int(df[2])),
            "available": _fmt_bytes(int(df[4])),
            "mount": df[6],
        }
    except (OSError, subprocess.CalledProcessError, IndexError, ValueError):
        disk = {"device": "unknown"}
    return {
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "disk": disk,
        "dir": str(folder),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "zstandard": zstandard.__version__,
        "zstd": zstandard.ZSTD_VERSION,
        "numpy": np.__version__,
        "transformers": transformers.__version__,
    }


# -- report ------------------------------------------------------------------------------------


def _verdict(met: bool | None) -> str:
    return "" if met is None else ("met" if met else "MISSED")


def report(doc: dict[str, Any], groups: list[GroupResult]) -> str:
    lines: list[str] = []
    m = doc["machine"]
    d = m["disk"]
    zstd_version = ".".join(str(x) for x in m["zstd"])
    lines.append("ckptwise storage benchmark (python -m bench.storage)")
    lines.append(
        f"machine: os.cpu_count()={m['cpu_count']} ({m['cpu']}); temp dir {m['dir']} on "
        f"{d.get('device')} {d.get('type', '')} mounted at {d.get('mount', '?')}, "
        f"{d.get('size', '?')} ({d.get('available', '?')} free)"
    )
    lines.append(
        f"versions: python {m['python']}, torch {m['torch']}, zstandard {m['zstandard']} "
        f"(libzstd {zstd_version}), numpy {m['numpy']}, transformers {m['transformers']}"
    )

    lm = doc["lm"]
    lines.append("")
    lines.append(
        f"1. Trained Llama-shaped LM state: {lm['params'] / 1e6:.1f}M params (hidden {lm['hidden']}, "
        f"{lm['layers']} layers, FFN {lm['intermediate']}, vocab {lm['vocab']}, untied), "
        f"{lm['steps']} AdamW steps (lr {lm['lr']:g}, batch {lm['batch']}x{lm['seq']} synthetic "
        f"Markov tokens), loss {lm['losses'][0]:.2f} -> {lm['losses'][-1]:.2f} in {lm['seconds']:.0f} s"
    )
    header = [
        "group", "raw MB", "ours MB", "zstd3 MB", "bound MB", "raw/ours", "raw/zstd3",
        "raw/bound", "vs zstd3", "enc MB/s", "dec MB/s", "target", "",
    ]  # fmt: skip
    rows = []
    for g in groups:
        text, met = g.target()
        rows.append(
            [
                g.name,
                _mb(g.raw),
                _mb(g.ours),
                _mb(g.zstd3),
                _mb(g.bound_bits / 8),
                f"{g.ratio_ours:.3f}x",
                f"{g.ratio_zstd3:.3f}x",
                f"{g.ratio_bound:.3f}x",
                f"{-g.fewer_than_zstd3:+.1f}%",
                f"{g.raw / g.encode_s / MB:.0f}",
                f"{g.raw / g.decode_s / MB:.0f}",
                text,
                _verdict(met),
            ]
        )
    lines.append(_table(header, rows, left=frozenset({0, 11, 12})))
    lines.append(
        "  ours = the 'bytegroup' codec, zstd3 = the 'zstd' codec (plain zstd level 3), both "
        "per tensor as the store writes them; MB = 10^6 bytes."
    )
    lines.append(
        "  vs zstd3 = ours/zstd3 - 1 (negative: fewer bytes). enc/dec = bytegroup on one "
        f"thread, raw MB per second, median of {REPEATS}; every tensor decoded bit-exactly (checked)."
    )
    lines.append(
        "  bound = order-0 per-plane entropy bound: for each tensor and byte plane i, the Shannon "
        "entropy of plane i's byte histogram, summed over planes and tensors; raw/bound = raw "
        "bits / those bits. A coder using context (bytes before, neighbouring planes) could beat it."
    )
    lines.append(
        f"  caveat: after {lm['steps']} steps the weights are still close to their N(0, 0.02) "
        "init; a long-trained checkpoint's value distribution (hence its ratios) may differ."
    )

    disk = doc["disk"]
    bf16 = next(g for g in groups if g.name == "bf16 weights")
    lines.append("")
    lines.append(
        f"2. Local disk ({m['dir']}): os.write + os.fsync of the raw bf16 weights "
        f"({_mb(bf16.raw)} MB) to a new file: {disk['raw_write_s'] * 1e3:.0f} ms = "
        f"{disk['write_MBps']:.0f} MB/s (median of {REPEATS})"
    )
    header = [
        "group", "raw write s", "encode s", "packed write s", "encode+write s", "sync save",
        "auto (x" + str(disk["planner_parallel"]) + " encoders)",
    ]  # fmt: skip
    rows = []
    for s in disk["saves"]:
        faster = s["compressed_s"] < s["raw_s"]
        change = s["compressed_s"] / s["raw_s"]
        rows.append(
            [
                s["group"],
                f"{s['raw_s']:.3f}",
                f"{s['encode_s']:.3f}",
                f"{s['packed_write_s']:.3f}" + ("" if s["measured"] else "*"),
                f"{s['compressed_s']:.3f}",
                f"{'faster' if faster else 'slower'} compressed ({change:.2f}x time)",
                s["auto_choice"],
            ]
        )
    lines.append(_table(header, rows, left=frozenset({0, 5, 6})))
    verdict = disk["saves"][0]
    lines.append(
        "  -> compressing the bf16 weights would have made a synchronous save "
        f"{'FASTER' if verdict['compressed_s'] < verdict['raw_s'] else 'SLOWER'} on this machine "
        f"({verdict['compressed_s']:.3f} s encode+write vs {verdict['raw_s']:.3f} s raw write)."
    )
    lines.append(
        "  raw write s is measured for bf16 and scaled by the measured rate for the others; "
        "packed write s is measured for bf16 (the encoded bytes written the same way), "
        "* = compressed bytes / measured write rate."
    )
    lines.append(
        "  auto = what ckptwise's CodecPlanner picks with these measured rates and ratios "
        "(encoders on worker threads overlap writes: max(n/(p*E), n/(r*W)) vs n/W)."
    )

    runs = doc["minicpmv"]
    lines.append("")
    lines.append(
        "3. MiniCPM-V-shaped fine-tune (examples/finetune_minicpmv.py): 50 steps, batch 8, "
        "a save every 5 steps, everything kept"
    )
    header = [
        "run", "saves", "bytes written", "ratio", "target", "", "files on disk", "files ratio",
        "trainable",
    ]  # fmt: skip
    rows = []
    variants: list[tuple[str, str, str, float | None]] = [
        ("full", "trainer", "Trainer save_steps=5", None),
        ("full", "ckptwise", "ckptwise every(5), keep all", FULL_RATIO_TARGET),
        ("lora", "trainer", "Trainer save_steps=5 (adapter)", None),
        ("lora", "ckptwise", 'ckptwise weights="all"', LORA_RATIO_TARGET),
        ("lora", "ckptwise_trainable", 'ckptwise weights="trainable" (ref.)', None),
    ]
    for kind, label, name, target in variants:
        if kind not in runs:
            continue
        r, base = runs[kind][label], runs[kind]["trainer"]
        ratio = r["bytes_written"] / base["bytes_written"]
        rows.append(
            [
                f"{'full' if kind == 'full' else 'LoRA r=8'}: {name}",
                str(len(r["saves"])),
                f"{r['bytes_written']:,}",
                f"{ratio:.3f}",
                f"<= {target:.3f}" if target is not None else "",
                _verdict(ratio <= target) if target is not None else "",
                f"{r['files_bytes']:,}",
                f"{r['files_bytes'] / base['files_bytes']:.3f}",
                f"{100 * r['trainable_fraction']:.2f}%",
            ]
        )
    lines.append(_table(header, rows, left=frozenset({0, 4, 5})))
    lines.append(
        "  bytes written: ckptwise's own count (callback.bytes_written: new objects after dedup, "
        "manifests not included); Trainer: bytes of each checkpoint-N folder at its on_save. "
        "ratio = ckptwise / Trainer on that figure (the target's)."
    )
    lines.append(
        "  files on disk: every file left at the end, measured here (ckptwise: the whole run "
        "folder, manifests included; Trainer: all checkpoint-N folders); files ratio likewise."
    )
    lines.append(
        "  LoRA: the Trainer saves only the adapter (plus optimizer, scheduler, RNG, state); "
        'ckptwise weights="all" also stores the frozen base model once.'
    )

    timings = doc["timings"]
    lines.append("")
    lines.append(
        "4. Wall time: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + f"; total {sum(timings.values()):.0f} s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storage", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures here as JSON")
    parser.add_argument(
        "--tmpdir", default=None, help="where files are written (default: system temp)"
    )
    parser.add_argument(
        "--train-steps", type=int, default=LMSetup.steps, help="AdamW steps for the LM"
    )
    parser.add_argument("--lr", type=float, default=LMSetup.lr, help="AdamW learning rate")
    parser.add_argument("--skip-runs", action="store_true", help="skip section 3 (the fine-tunes)")
    args = parser.parse_args(argv)

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    doc: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ckptwise-bench-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        doc["machine"] = machine(work)

        setup = LMSetup(steps=args.train_steps, lr=args.lr)
        with _section("train LM", timings):
            model, optimizer = train_lm(setup)
        doc["lm"] = asdict(setup)

        groups: list[GroupResult] = []
        encoded: dict[str, list[bytes]] = {}
        with _section("codecs", timings):
            torch.set_num_threads(1)
            state = state_groups(model, optimizer)
            for name, tensors in state.items():
                result, packed = measure_group(name, tensors)
                groups.append(result)
                if name == "fp32 Adam exp_avg_sq":
                    groups.append(combine("fp32 Adam (both)", groups[-2:]))
                if name == "bf16 weights":
                    encoded[name] = packed
                print(f"[bench]   {name}: {result.ratio_ours:.3f}x", file=sys.stderr, flush=True)
        doc["groups"] = [g.figures() for g in groups]

        with _section("disk", timings):
            bf16 = next(g for g in groups if g.name == "bf16 weights")
            bf16_raw: list[bytes | memoryview] = [tensor_bytes(t) for t in state["bf16 weights"]]
            raw_s = fsync_write_seconds(work, bf16_raw)
            packed_s = fsync_write_seconds(work, list(encoded["bf16 weights"]))
            rate = bf16.raw / raw_s
            planner = CodecPlanner(mode="auto", write_rate=rate)
            saves = []
            for g in groups:
                if g.name == "fp32 Adam (both)":
                    continue
                measured = g.name == "bf16 weights"
                g_raw_s = raw_s if measured else g.raw / rate
                g_packed_s = packed_s if measured else g.ours / rate
                planner.encode_rate = g.raw / g.encode_s
                planner.ratios = {g.itemsize: g.ratio_ours}
                dtype = torch.bfloat16 if g.itemsize == 2 else torch.float32
                choice, why = planner.choose(dtype, g.raw)
                saves.append(
                    {
                        "group": g.name,
                        "measured": measured,
                        "raw_s": g_raw_s,
                        "encode_s": g.encode_s,
                        "packed_write_s": g_packed_s,
                        "compressed_s": g.encode_s + g_packed_s,
                        "auto_choice": choice,
                        "auto_reason": why,
                    }
                )
            doc["disk"] = {
                "raw_write_s": raw_s,
                "packed_write_s": packed_s,
                "write_MBps": rate / MB,
                "planner_parallel": planner.parallel,
                "saves": saves,
            }
        del model, optimizer, encoded, state, bf16_raw

        runs: dict[str, Any] = {}
        if not args.skip_runs:
            with _section("MiniCPM-V full", timings):
                runs["full"] = minicpmv_full(work)
            with _section("MiniCPM-V LoRA", timings):
                runs["lora"] = minicpmv_lora(work)
        doc["minicpmv"] = runs
    doc["timings"] = timings

    text = report(doc, groups)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
