"""The GPU check: hataori's GPU tests and benchmarks in one run, every figure in one results file.

Run through ``scripts/gpu_check.sh``, which installs what is missing first. Stages, in this order
(correctness before speed), each in its own process with its own time limit:

- ``tests``: the kernel tests (bf16, fp16, fp32 against the references, the 2x-PyTorch-error rule),
  the model tests (flash-attn and auto backends) and tests/test_gpu.py (a bf16 step with every kernel
  choice; a two-step bf16 ``hataori pretrain`` of the 125m preset with DeepSpeed on one GPU).
- ``attention``: benchmarks/kernel_attention.py, causal, head dims 64 and 128, 1k-16k tokens.
- ``cross_entropy``: benchmarks/kernel_cross_entropy.py, 32k-100k vocabularies.
- ``model_step``: benchmarks/bench_model.py, the 1b preset at sequence 4096, every kernel choice.

The results (``OUT/gpu-check.json``: the machine, driver and package versions, each stage's outcome,
every figure, and hataori's GPU targets beside what was measured; ``OUT/gpu-check.md``: the same as
tables; ``OUT/gpu-check.log``: every stage's output) are rewritten after each stage, so a run cut short
keeps what it measured. ``--rehearse`` runs every stage on the CPU at toy sizes (tests/test_gpu.py
under HATAORI_GPU_REHEARSAL=1, the benchmarks' CPU modes) to check the script itself: its arguments,
its stages' command lines and the files it writes. Exit status 0 when every stage passed, 1 otherwise.

    python scripts/gpu_check.py [--out DIR [--replace]] [--only tests,attention] [--rehearse] [--workers N]
        [--time-budget SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from hataori.errors import HataoriError
from hataori.outputs import claim

REPO = Path(__file__).resolve().parents[1]
KERNEL_TESTS = ["tests/test_kernel_attention.py", "tests/test_kernel_cross_entropy.py", "tests/test_kernel_rmsnorm.py",
                "tests/test_kernel_rope.py", "tests/test_kernel_swiglu.py", "tests/test_kernel_model.py",
                "tests/test_model.py", "tests/test_gpu.py"]
MIN_STAGE_S = 20
"""Under --time-budget, a stage with less time than this left is not started."""
STAGES = ("tests", "attention", "cross_entropy", "model_step")
"""The stages, in the order they run."""
PACKAGES = ("torch", "triton", "deepspeed", "flash-attn", "transformers", "sentencepiece", "numpy", "hataori")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    figures: str | None = None
    """The JSON file (in the work folder) the stage writes its figures to."""


def stages(work: Path, rehearse: bool, workers: int, peak_tflops: float | None) -> list[Stage]:
    """The stages' command lines (:data:`STAGES`, in order): on a GPU at full sizes, in a rehearsal at
    toy sizes on the CPU."""
    py = sys.executable
    results = {"HATAORI_GPU_RESULTS": str(work)}
    if rehearse:
        return [
            Stage("tests", [py, "-m", "pytest", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider",
                            "--junitxml", str(work / "tests.xml")], 300, {**results, "HATAORI_GPU_REHEARSAL": "1"}),
            Stage("attention", [py, "benchmarks/kernel_attention.py", "--device", "cpu", "--seq-lens", "64,128",
                                "--head-dims", "64", "--heads", "4", "--kv-heads", "2", "--tokens", "256",
                                "--json", str(work / "attention.json")], 60, figures="attention.json"),
            Stage("cross_entropy", [py, "benchmarks/kernel_cross_entropy.py", "--tokens", "256", "--width", "64",
                                    "--vocabs", "1000,64000", "--json", str(work / "cross_entropy.json")], 60,
                  figures="cross_entropy.json"),
            Stage("model_step", [py, "benchmarks/bench_model.py", "--device", "cpu", "--micro-batch", "2",
                                 "--seq-len", "32", "--steps", "1", "--warmup", "1", "d_model=64", "n_layers=2",
                                 "n_heads=4", "n_kv_heads=2", "vocab_size=512", "max_seq_len=64",
                                 "--json", str(work / "model_step.json")], 120, figures="model_step.json"),
        ]
    xdist = ["-n", str(workers)] if workers > 1 else []
    peak = ["--peak-tflops", str(peak_tflops)] if peak_tflops else []
    return [
        Stage("tests", [py, "-m", "pytest", *KERNEL_TESTS, "-q", "-p", "no:cacheprovider", *xdist,
                        "--junitxml", str(work / "tests.xml")], 300, results),
        Stage("attention", [py, "benchmarks/kernel_attention.py", "--json", str(work / "attention.json")], 150,
              figures="attention.json"),
        Stage("cross_entropy", [py, "benchmarks/kernel_cross_entropy.py", "--json",
                                str(work / "cross_entropy.json")], 60, figures="cross_entropy.json"),
        Stage("model_step", [py, "benchmarks/bench_model.py", "--preset", "configs/model/1b.yaml", "--seq-len", "4096",
                             "--micro-batch", "4", "max_seq_len=4096", *peak, "--json",
                             str(work / "model_step.json")], 200, figures="model_step.json"),
    ]


# ----------------------------------------------------------------------------- the machine


def environment() -> dict:
    """The device, driver and package versions (read in this process, which runs no GPU work)."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": platform.node(), "python": platform.python_version(), "cpus": os.cpu_count(),
           "commit": _commit(), "cuda": torch.version.cuda, "device": None, "driver": None}
    env["packages"] = {}
    for name in PACKAGES:
        try:
            env["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env["packages"][name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
        smi = shutil.which("nvidia-smi")
        if smi:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True).stdout.strip()
            env["driver"] = out.splitlines()[0] if out else None
    return env


def _commit() -> str | None:
    """The commit checked: HATAORI_COMMIT where the copy has no .git (a copied working tree), else git's."""
    if os.environ.get("HATAORI_COMMIT"):
        return os.environ["HATAORI_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


# ----------------------------------------------------------------------------- running and reading


def run_stage(stage: Stage, log) -> dict:
    """Run one stage, its output to ``log`` (and the console); its outcome, time and output's end."""
    log.write(f"\n===== {stage.name}: {' '.join(stage.argv)}\n")
    log.flush()
    print(f"===== {stage.name} (limit {stage.timeout_s} s)", flush=True)
    env = {**os.environ, **stage.env, "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    lines = []
    with subprocess.Popen(stage.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", start_new_session=True) as proc:
        timer = _Deadline(proc, stage.timeout_s)
        for line in proc.stdout:
            lines.append(line)
            log.write(line)
            sys.stdout.write(line)
        proc.wait()
        timer.cancel()
    seconds = time.monotonic() - start
    status = "timed out" if timer.fired else "passed" if proc.returncode == 0 else "failed"
    log.write(f"===== {stage.name}: {status} in {seconds:.1f} s\n")
    log.flush()
    return {"status": status, "exit_code": proc.returncode, "seconds": round(seconds, 1),
            "command": " ".join(Path(a).name if a == sys.executable else a for a in stage.argv),
            "output_tail": "".join(lines[-40:])}


class _Deadline:
    """Kills a stage's whole process group once its time is up."""

    def __init__(self, proc: subprocess.Popen, seconds: float):
        self.fired = False
        self._proc = proc
        self._timer = threading.Timer(seconds, self._kill)
        self._timer.daemon = True
        self._timer.start()

    def _kill(self) -> None:
        self.fired = True
        try:
            os.killpg(self._proc.pid, 9)
        except ProcessLookupError:
            pass

    def cancel(self) -> None:
        self._timer.cancel()


def read_tests(xml_path: Path) -> dict | None:
    """Counts and the failures of a pytest JUnit XML report; None if the run wrote none."""
    if not xml_path.is_file():
        return None
    root = ET.parse(xml_path).getroot()
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], {}
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            reason = (outcome.get("message") or "").strip()
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (outcome.get("message") or "")[:500]})
    return {**counts, "failures": failures, "skip_reasons": skips}


def targets(results: dict) -> list[dict]:
    """hataori's GPU targets beside the figures measured (None where a figure is missing): attention at the
    Triton tutorial's level on an H100 and at least SDPA's; a 1b step at OLMo-core's published 55,000 tokens/s
    per H100 for its 1B, less a margin (45,000); the chunked loss's peak under a quarter of the plain one's."""
    rows = []
    attention = (results.get("attention") or {}).get("rows", [])

    def best(provider: str, key: str) -> float | None:
        values = [r[key] for r in attention if r["provider"] == provider and r["head_dim"] == 128
                  and 4096 <= r["seq_len"] <= 8192 and r.get(key) is not None]
        return max(values) if values else None

    sdpa_providers = sorted({r["provider"] for r in attention if r["provider"].startswith("sdpa")})
    triton_fwd, triton_bwd = best("triton", "fwd_tflops"), best("triton", "bwd_tflops")
    rows.append(_target("attention forward, causal, head dim 128, bf16, 4k-8k (TFLOP/s)", ">= 450", triton_fwd,
                        None if triton_fwd is None else triton_fwd >= 450))
    rows.append(_target("attention backward, same shapes (TFLOP/s)", ">= 300", triton_bwd,
                        None if triton_bwd is None else triton_bwd >= 300))
    for key, what in (("fwd_tflops", "forward"), ("bwd_tflops", "backward")):
        ours = best("triton", key)
        sdpa = max(filter(None, (best(name, key) for name in sdpa_providers)), default=None)  # SDPA's best backend
        rows.append(_target(f"attention {what} against SDPA's best backend in the same run (ratio)", ">= 1.0",
                            None if ours is None or not sdpa else ours / sdpa,
                            None if ours is None or not sdpa else ours >= sdpa))
    model = [r for r in (results.get("model_step") or {}).get("rows", []) if r.get("tokens_per_s")]
    fastest = max(model, key=lambda r: r["tokens_per_s"], default=None)
    rows.append(_target("1b preset, seq 4096, bf16, one GPU (tokens/s, fastest variant)", ">= 45000",
                        fastest and fastest["tokens_per_s"],
                        None if fastest is None else fastest["tokens_per_s"] >= 45000,
                        fastest and f"{fastest['name']}, MFU {fastest['mfu']:.1%}" if fastest and fastest.get("mfu")
                        else fastest and fastest["name"]))
    ce = {(r["vocab"], r["loss"]): r for r in (results.get("cross_entropy") or {}).get("rows", [])}
    plain, chunked = ce.get((64000, "plain"), {}).get("peak_gib"), ce.get((64000, "chunked"), {}).get("peak_gib")
    ratio = None if plain is None or chunked is None else chunked / plain
    rows.append(_target("chunked loss peak memory at a 64k vocabulary (fraction of the plain loss's)", "< 0.25",
                        ratio, None if ratio is None else ratio < 0.25))
    return rows


def _target(what: str, target: str, measured, met, note: str | None = None) -> dict:
    return {"what": what, "target": target, "measured": measured, "met": met, "note": note}


# ----------------------------------------------------------------------------- the report


def _num(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict) -> str:
    env = results["environment"]
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    lines = [f"# GPU check, {env['date']}", "",
             f"{env['device'] or 'no GPU (rehearsal on the CPU)'}; driver {env['driver'] or '-'}, "
             f"CUDA {env['cuda'] or '-'}; "
             f"Python {env['python']}; {packages}; commit {env['commit'] or 'unknown'}. Mode: {results['mode']}.", "",
             "| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {stage['status']} | {stage['seconds']} |" for name, stage in results["stages"].items()]
    tests = results.get("tests")
    if tests:
        lines += ["", f"Tests: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                      f"{tests['skipped']} skipped."]
        lines += [f"- FAILED {f['test']}: {f['message'].splitlines()[0] if f['message'] else ''}"
                  for f in tests["failures"]]
    lines += ["", "| target | wanted | measured | met |", "|---|---|---|---|"]
    for row in results["targets"]:
        measured = _num(row["measured"], ".2f" if row["measured"] is not None and row["measured"] < 10 else ".0f")
        met = {True: "yes", False: "no", None: "-"}[row["met"]]
        lines.append(f"| {row['what']} | {row['target']} | {measured}{' (' + row['note'] + ')' if row['note'] else ''} "
                     f"| {met} |")
    pretrain = results.get("pretrain")
    if pretrain:
        step = pretrain["train"][-1]
        lines += ["", f"125m pretrain, step 2: loss {step['loss']:.4f}, "
                      f"{step['tokens'] / step['seconds']:,.0f} tokens/s; "
                      f"validation loss {pretrain['val']['loss']:.4f} against {pretrain['reference_val_loss']:.4f} "
                      "from the checkpoint in fp32."]
    attention = results.get("attention")
    if attention:
        lines += ["", f"Attention ({attention['device']}, {attention['settings']['dtype']}, causal, "
                      f"H={attention['settings']['heads']}, H_kv={attention['settings']['kv_heads']}), TFLOP/s:", "",
                  "| provider | Dh | T | B | fwd | bwd | fwd+bwd |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['provider']} | {r['head_dim']} | {r['seq_len']} | {r['batch']} | "
                  + (f"{r['note']} | | |" if "note" in r else
                     f"{_num(r['fwd_tflops'])} | {_num(r['bwd_tflops'])} | {_num(r['fwd_bwd_tflops'])} |")
                  for r in attention["rows"]]
    ce = results.get("cross_entropy")
    if ce:
        lines += ["", f"Cross-entropy (N={ce['settings']['tokens']}, D={ce['settings']['width']}, "
                      f"{ce['settings']['dtype']}):", "",
                  "| V | loss | saved GiB | peak GiB | ms | TFLOP/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['vocab']} | {r['loss']} | {_num(r['saved_gib'], '.3f')} | {_num(r.get('peak_gib'), '.3f')} "
                  f"| {_num(r.get('ms'), '.2f')} | {_num(r.get('tflops'))} |" for r in ce["rows"]]
    model = results.get("model_step")
    if model:
        s = model["settings"]
        lines += ["", f"Training step ({s['preset']} {' '.join(s['overrides'])}, {s['params'] / 1e6:.0f}M parameters, "
                      f"{s['dtype']}, B={s['micro_batch']} T={s['seq_len']}, {s['steps']} timed steps):", "",
                  "| variant | attention | kernels | tokens/s | step ms | TFLOP/s | MFU | peak GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in model["rows"]:
            if r["note"]:
                lines.append(f"| {r['name']} | {r['note']} | | | | | | |")
            else:
                lines.append(f"| {r['name']} | {r['attention']} | {r['kernels']} | {_num(r['tokens_per_s'], '.0f')} | "
                             f"{_num(r['step_ms'])} | {_num(r['tflops'])} | "
                             f"{_num(r['mfu'] and 100 * r['mfu'])}{'%' if r['mfu'] else ''} | "
                             f"{_num(r['peak_gib'], '.2f')} |")
    return "\n".join(lines) + "\n"


def write(out: Path, results: dict) -> None:
    results["targets"] = targets(results)
    if results["mode"] != "GPU":  # toy sizes on a CPU: the figures are the script's check, not the targets'
        for row in results["targets"]:
            row["met"] = None
    for name, text in (("gpu-check.json", json.dumps(results, indent=1, default=str) + "\n"),
                       ("gpu-check.md", markdown(results))):
        temp = out / f".{name}.tmp"
        temp.write_text(text, encoding="utf-8")
        temp.replace(out / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for the results (default benchmarks/results/gpu-check-DATE)")
    parser.add_argument("--only", help="comma-separated stages to run (default: all, in order)")
    parser.add_argument("--rehearse", action="store_true", help="run every stage on the CPU at toy sizes")
    parser.add_argument("--replace", action="store_true", help="write over the results an earlier check left in --out")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="pytest-xdist processes for the tests, when pytest-xdist is installed (default 8)")
    parser.add_argument("--time-budget", type=float, metavar="SECONDS",
                        help="the whole check's time: each stage's limit is cut to what is left, and a stage with "
                             f"less than {MIN_STAGE_S} s left is not run (default: each stage's own limit)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    import torch

    if not args.rehearse and not torch.cuda.is_available():
        parser.error(f"no CUDA device here (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                     "run with --rehearse to check the script on the CPU")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.time_budget is not None and not args.time_budget > 0:
        parser.error(f"--time-budget must be a positive number of seconds, got {args.time_budget}")
    wanted = STAGES
    if args.only:
        wanted = tuple(name.strip() for name in args.only.split(","))
        unknown = [name for name in wanted if name not in STAGES]
        if unknown:
            parser.error(f"--only: unknown stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    out = args.out or REPO / "benchmarks" / "results" / f"gpu-check-{datetime.date.today().isoformat()}"
    try:  # a GPU's figures are not written over unasked
        held = claim(out, "gpu-check", option="--out")
    except HataoriError as err:
        parser.error(str(err))
    try:
        held.check_replace(args.replace)
    except HataoriError as err:
        held.release()
        parser.error(str(err))
    with held:
        held.mark()
        return check(args, out, wanted, began)


def check(args: argparse.Namespace, out: Path, wanted: tuple[str, ...], began: float) -> int:
    """Run the stages ``wanted`` into the held results folder ``out``; 0 when every one passed."""
    work = Path(tempfile.mkdtemp(prefix="hataori-gpu-check-"))
    env = environment()
    peak = None
    if env["device"]:
        from hataori.train.metrics import peak_flops

        flops = peak_flops(env["device"], "bf16")
        peak = flops / 1e12 if flops else None
    workers = args.workers if importlib.util.find_spec("xdist") else 1
    plan = [stage for stage in stages(work, args.rehearse, workers, peak) if stage.name in wanted]

    results = {"check": "scripts/gpu_check.sh", "mode": "rehearsal on the CPU" if args.rehearse else "GPU",
               "environment": env, "stages": {}}
    write(out, results)
    with open(out / "gpu-check.log", "w", encoding="utf-8") as log:
        for stage in plan:
            left = math.inf if args.time_budget is None else args.time_budget - (time.monotonic() - began)
            if left < MIN_STAGE_S:
                results["stages"][stage.name] = {"status": "not run", "seconds": 0,
                                                 "note": f"{max(left, 0):.0f} s of --time-budget left"}
                write(out, results)
                continue
            stage = dataclasses.replace(stage, timeout_s=int(min(stage.timeout_s, left)))
            results["stages"][stage.name] = run_stage(stage, log)
            if stage.name == "tests":
                results["tests"] = read_tests(work / "tests.xml")
                pretrain = work / "pretrain.json"
                results["pretrain"] = json.loads(pretrain.read_text()) if pretrain.is_file() else None
            elif stage.figures and (work / stage.figures).is_file():
                results[stage.name] = json.loads((work / stage.figures).read_text())
            write(out, results)
    shutil.rmtree(work, ignore_errors=True)
    print(markdown(results))
    print(f"results: {out / 'gpu-check.json'}, {out / 'gpu-check.md'}, {out / 'gpu-check.log'}")
    return 0 if all(stage["status"] == "passed" for stage in results["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
