"""Paired speed/memory comparison: our default model vs TotalSegmentator `--fast` (issue 16).

Setup (once; the TotalSegmentator venv is separate from ours, nothing is downloaded at run time):

    python3 -m venv /work/tsvenv
    /work/tsvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 "TotalSegmentator==2.18.*"
        # measured with TotalSegmentator 2.18.0, nnunetv2 2.8.1, dynamic_network_architectures 0.4.4
    .venv/bin/python bench/bench_totalseg.py --ts-venv /work/tsvenv --make-weights
        # writes <ts-venv>/totalseg_home: config.json (send_usage_stats false) and
        # nnunet/results/Dataset297_TotalSegmentator_total_3mm_1559subj/
        #     nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/
        #         plans.json  (bench/totalseg_plans/Dataset297_plans.json: the real architecture, see its README)
        #         dataset.json (labels = the installed TotalSegmentator's class_map["total"], 117 + background)
        #         fold_0/checkpoint_final.pth  (the network built by nnU-Net from those plans, RANDOM weights)

Run (paired and interleaved: each repeat runs every setting once, so a busy moment hits all alike):

    .venv/bin/python bench/bench_totalseg.py --ts-venv /work/tsvenv --repeats 3 [--ct CT.nii.gz] [--threads 2]

Settings, each a fresh whole process timed from outside (start-up, model load, read, resampling, inference,
export included):
- ours fp32 / ours bf16 / ours auto: `python -m AbdomenSegLib segment CT OUT --overwrite --device cpu
  --precision P` (bf16 only where the CPU has bf16 instructions; auto = the CLI default);
- TotalSegmentator --fast: `TotalSegmentator -i CT -o OUT --fast --device cpu --ml --nr_thr_resamp 1
  --nr_thr_saving 1 -q` (--ml: one multi-label file, like ours; no TTA in --fast; random weights, so the
  segmentation is meaningless but the work done is the real pipeline's).
Threads: OMP/MKL/OPENBLAS_NUM_THREADS=--threads for both. TotalSegmentator sets torch's threads to
multiprocessing.cpu_count() on CPU; where that differs from --threads, it is started through a two-line
wrapper that makes cpu_count() return --threads (on a 2-core machine the plain console script runs).
Time: the --repeats interleaved runs are not polled (reading a big process's smaps ten times a second costs CPU on
2 cores and slowed the runs it measured). Memory: one more run per setting, its process tree polled every
0.1 s (psutil): peak of the summed RSS and of the summed PSS
(PSS does not count pages shared between the parent and its worker processes twice), plus the largest
single-process max RSS from the kernel (wait4 rusage, covers the whole tree, no sampling).
Also printed: the tree's CPU seconds (user+sys, from wait4: less sensitive to other load than wall time,
but not immune) and the 1-min load average before each run, to judge how quiet the machine was.
The input is bench_segment.py's: a real BTCV case in HU resampled to 512x512x<slices> (or --ct).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANS = Path(__file__).resolve().parent / "totalseg_plans" / "Dataset297_plans.json"
DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
MODEL_DIR = f"{TRAINER}__nnUNetPlans__3d_fullres"


def ts_home(ts_venv: Path) -> Path:
    return ts_venv / "totalseg_home"


# ---------------------------------------------------------------- random-weights folder (runs in the TS venv)


def make_weights_child(home: Path, plans_path: Path, seed: int = 0):
    """Build the Dataset297 folder the way nnU-Net reads it; run with the TotalSegmentator venv's python."""
    import torch
    import totalsegmentator.nnunet  # noqa: F401  (registers TotalSegmentator's trainer lookup, as at run time)
    from nnunetv2.inference import predict_from_raw_data as prd
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from totalsegmentator.map_to_binary import class_map

    plans = json.loads(plans_path.read_text())
    labels = {"background": 0}
    labels.update({name: int(i) for i, name in sorted(class_map["total"].items())})
    dataset_json = {
        "name": "TotalSegmentator",
        "description": "Segmentation of TotalSegmentator classes",
        "reference": "https://zenodo.org/record/6802614",
        "licence": "Apache 2.0",
        "release": "2.0",
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 1559,
        "file_ending": ".nii.gz",
        "overwrite_image_reader_writer": "NibabelIOWithReorient",
        "_bench_note": "labels from TotalSegmentator's class_map['total']; RANDOM-weights benchmark folder",
    }
    out = home / "nnunet" / "results" / DATASET / MODEL_DIR
    (out / "fold_0").mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(plans, indent=4))
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=4))

    # The network exactly as nnUNetPredictor.initialize_from_trained_model_folder builds it.
    torch.manual_seed(seed)
    pm = PlansManager(json.loads(plans_path.read_text()))
    cm = pm.get_configuration("3d_fullres")
    trainer_class = prd.recursive_find_trainer_class_by_name(TRAINER)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=False)
    # nnU-Net checkpoints also carry the SGD state (momentum buffers of the network's size): torch.load reads it.
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    for p in network.parameters():
        optimizer.state[p]["momentum_buffer"] = torch.randn_like(p) * 1e-3
    checkpoint = {
        "network_weights": network.state_dict(),
        "optimizer_state": optimizer.state_dict(),
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 4000,
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": dataset_json,
            "device": torch.device("cpu"),
        },
        "trainer_name": TRAINER,
        "inference_allowed_mirroring_axes": None,  # the NoMirroring trainers store None
    }
    torch.save(checkpoint, out / "fold_0" / "checkpoint_final.pth")
    # No usage statistics, no first-run prompts (TotalSegmentator reads this file at every run).
    (home / "config.json").write_text(
        json.dumps(
            {
                "totalseg_id": "totalseg_benchmark",
                "send_usage_stats": False,
                "prediction_counter": 0,
                "statistics_disclaimer_shown": True,
            },
            indent=4,
        )
    )
    n_params = sum(p.numel() for p in network.parameters())
    print(
        f"wrote {out} ({type(network).__name__}, {n_params / 1e6:.1f} M parameters, {n_out} outputs, "
        f"patch {cm.patch_size}, spacing {cm.spacing})"
    )


def make_weights(ts_venv: Path):
    home = ts_home(ts_venv)
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(ts_venv / "bin" / "python"), __file__, "--make-weights-child", str(home)],
        check=True,
        env=ts_env(ts_venv, 2),
    )


# ---------------------------------------------------------------- measuring a process tree


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd, env, cwd=None, interval=None) -> dict:
    """Wall seconds of `cmd` (and, with `interval`, the peak memory of it and every process it starts, polled:
    reading /proc/<pid>/smaps_rollup of a 1.5 GB process ten times a second costs CPU on a 2-core machine, so
    timed runs do not poll and memory gets a pass of its own)."""
    import psutil

    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parent = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    max_procs = 1
    rusage = None
    while interval is None:
        log = proc.stdout.read()  # to EOF: a full pipe must never stall the child
        _, status, rusage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        break
    while interval is not None:
        try:
            procs = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        rss = pss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
            pss += _pss_kb(p.pid) * 1024
        peak_rss, peak_pss, max_procs = max(peak_rss, rss), max(peak_pss, pss), max(max_procs, len(procs))
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            rusage, code = ru, os.waitstatus_to_exitcode(status)
            break
        time.sleep(interval)
    seconds = time.perf_counter() - t0
    proc.returncode = code
    log = (log if interval is None else proc.stdout.read()).decode(errors="replace")
    if code not in (0, 3):  # 3: our CLI's "done, with QC warnings"
        raise RuntimeError(f"{cmd[:3]}... exit {code}:\n{log[-3000:]}")
    return {
        "seconds": seconds,
        "cpu_seconds": rusage.ru_utime + rusage.ru_stime,
        "load_before": load_before,
        "tree_peak_rss_gb": peak_rss / 1024**3,
        "tree_peak_pss_gb": peak_pss / 1024**3,
        "max_single_rss_gb": rusage.ru_maxrss / 1024**2,
        "processes": max_procs,
        "log": log,
    }


def thread_env(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[k] = str(threads)
    return env


def ts_env(ts_venv: Path, threads: int) -> dict:
    env = thread_env(threads)
    env["TOTALSEG_HOME_DIR"] = str(ts_home(ts_venv))
    env.pop("TOTALSEG_WEIGHTS_PATH", None)
    env["PATH"] = f"{ts_venv / 'bin'}:{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def ts_command(ts_venv: Path, ct: str, out: str, threads: int, extra) -> list:
    args = [
        "-i",
        ct,
        "-o",
        out,
        "--fast",
        "--device",
        "cpu",
        "--ml",
        "--nr_thr_resamp",
        "1",
        "--nr_thr_saving",
        "1",
        "-q",
    ] + list(extra)
    if (os.cpu_count() or 1) == threads:
        return [str(ts_venv / "bin" / "TotalSegmentator")] + args
    # TotalSegmentator calls torch.set_num_threads(multiprocessing.cpu_count()) on CPU: make that --threads.
    wrapper = (
        f"import sys, multiprocessing; multiprocessing.cpu_count = lambda: {threads}; "
        "from totalsegmentator.bin.TotalSegmentator import main; sys.argv[0] = 'TotalSegmentator'; "
        "sys.exit(main())"
    )
    return [str(ts_venv / "bin" / "python"), "-c", wrapper] + args


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ts-venv", type=Path, default=Path("/work/tsvenv"))
    parser.add_argument("--make-weights", action="store_true", help="(re)build the random-weights folder and exit")
    parser.add_argument("--make-weights-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ct", help="CT in HU (default: bench_segment.py's 512x512x--slices BTCV case)")
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32,bf16", help="our CPU precisions (comma-separated; auto allowed)")
    parser.add_argument("--ts-extra", default="", help="extra TotalSegmentator arguments (space-separated)")
    parser.add_argument("--json", help="write all runs here")
    args = parser.parse_args()
    if args.make_weights_child:
        make_weights_child(args.make_weights_child, PLANS)
        return
    ts_venv = args.ts_venv.resolve()
    if args.make_weights:
        make_weights(ts_venv)
        return
    checkpoint = ts_home(ts_venv) / "nnunet" / "results" / DATASET / MODEL_DIR / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        sys.exit(f"no weights folder under {ts_home(ts_venv)}: run with --make-weights first")

    from bench_segment import make_input  # noqa: E402  (the same input as the stage benchmark)

    from AbdomenSegLib.core.precision import cpu_has_native_bf16  # noqa: E402

    ts_version = subprocess.run(
        [
            str(ts_venv / "bin" / "python"),
            "-c",
            "from importlib.metadata import version as v; " "print(v('TotalSegmentator'), v('nnunetv2'), v('torch'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    precisions = [p for p in args.precision.split(",") if p and (p != "bf16" or cpu_has_native_bf16())]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.ct:
            ct, label = args.ct, args.ct
        else:
            ct = str(tmp / "ct512.nii.gz")
            label = make_input(Path(ct), args.slices)
        print(f"input: {label}")
        print(
            f"TotalSegmentator {ts_version[0]} (nnunetv2 {ts_version[1]}, torch {ts_version[2]}), --fast with "
            f"RANDOM weights; threads {args.threads}; os.cpu_count() {os.cpu_count()}; "
            f"CPU bf16 instructions: {cpu_has_native_bf16()}"
        )
        settings = []
        for p in precisions:
            cmd = [
                sys.executable,
                "-m",
                "AbdomenSegLib",
                "segment",
                ct,
                str(tmp / "ours.nii.gz"),
                "--overwrite",
                "--device",
                "cpu",
                "--precision",
                p,
            ]
            settings.append((f"ours {p}", cmd, thread_env(args.threads), ROOT))
        ts_out = tmp / "ts_out.nii.gz"
        settings.append(
            (
                "TotalSegmentator --fast",
                ts_command(ts_venv, ct, str(ts_out), args.threads, args.ts_extra.split()),
                ts_env(ts_venv, args.threads),
                tmp,
            )
        )
        runs = {name: [] for name, *_ in settings}
        for r in range(args.repeats):  # timed, interleaved, without memory polling
            for name, cmd, env, cwd in settings:
                time.sleep(2.0)  # let the previous run's processes finish exiting
                result = measure(cmd, env, cwd)
                log = result.pop("log")
                runs[name].append(result)
                print(
                    f"  repeat {r + 1} {name:26s} {result['seconds']:6.2f} s (CPU {result['cpu_seconds']:6.1f} s, "
                    f"load before {result['load_before']:.1f})",
                    flush=True,
                )
                if r == 0 and name.startswith("Total") and log.strip():
                    print("    TotalSegmentator said: " + " | ".join(log.strip().splitlines()[-3:]))
        memory = {}
        for name, cmd, env, cwd in settings:  # one more run each, polled every 0.1 s for memory
            time.sleep(2.0)
            memory[name] = measure(cmd, env, cwd, interval=0.1)
            memory[name].pop("log")
            m = memory[name]
            print(
                f"  memory pass {name:26s} tree RSS {m['tree_peak_rss_gb']:.2f} GB  PSS {m['tree_peak_pss_gb']:.2f} GB"
                f"  max single RSS {m['max_single_rss_gb']:.2f} GB  ({m['processes']} proc; {m['seconds']:.2f} s polled)",
                flush=True,
            )
        ts_name = "TotalSegmentator --fast"
        ts_med = statistics.median(x["seconds"] for x in runs[ts_name])
        print(
            f"\nwhole process, {args.repeats} paired repeats (median [min-max]); ratio = ours / TS median time; "
            "memory = the polled pass"
        )
        ts_cpu = statistics.median(x["cpu_seconds"] for x in runs[ts_name])
        print(
            f"  {'setting':26s} {'seconds':>22s} {'ratio':>6s} {'CPU s':>7s} {'ratio':>6s} {'tree RSS':>9s} "
            f"{'tree PSS':>9s} {'1-proc RSS':>10s}"
        )
        for name, rs in runs.items():
            s = [x["seconds"] for x in rs]
            med = statistics.median(s)
            cpu = statistics.median(x["cpu_seconds"] for x in rs)
            ratio = f"{med / ts_med:6.2f}" if name != ts_name else "     -"
            cpu_ratio = f"{cpu / ts_cpu:6.2f}" if name != ts_name else "     -"
            print(
                f"  {name:26s} {med:7.2f} [{min(s):5.2f}-{max(s):5.2f}] s {ratio} {cpu:7.1f} {cpu_ratio} "
                f"{memory[name]['tree_peak_rss_gb']:7.2f}GB {memory[name]['tree_peak_pss_gb']:7.2f}GB "
                f"{memory[name]['max_single_rss_gb']:8.2f}GB"
            )
        for name in runs:
            if name != ts_name:
                paired = [a["seconds"] / b["seconds"] for a, b in zip(runs[name], runs[ts_name])]
                print(f"  paired ratios {name}: " + ", ".join(f"{x:.3f}" for x in paired))
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {"input": label, "ts_version": ts_version, "threads": args.threads, "runs": runs, "memory": memory},
                    indent=2,
                )
            )


if __name__ == "__main__":
    main()
