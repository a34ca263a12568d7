"""Reproduction benchmark on the embedded default (the MimiQ paper's Table 1 / Table 4 rows).

Fashion-MNIST top-1 of the fake-quant student per bit setting, mean +- std over seeds:
  1 full-precision teacher          2 PTQ: calibration on MimiQ images, no fine-tuning
  3 Gaussian noise + KL             4 base synthesis (CE + TV) + KL
  5 MimiQ synthesis + KL            6 MimiQ synthesis + KL + HAD (the full method)
  7 real-data QAT: the fine-tuning of row 6 on as many real training images
 12 PTQ calibrated on Gaussian noise  13 PTQ calibrated on as many real training images
  8 row 6 with MaskAQ's patch-similarity entropy term in synthesis
  9 row 6 with MaskAQ's token-weighted L_HAD
 10 row 6 on a MaskAQ set: MimiQ + patch entropy + masked attention alignment with the PTQ
    student (calibrated on the row-6 MimiQ set), one set per bit setting
 11 full MaskAQ: row 10 + token-weighted L_HAD + periodic refresh of the set against the
    current student during fine-tuning
 14-16 ModelOpt's ONNX PTQ of a quantize run's float graph (--float-run RUN: RUN/export/model_fp32.onnx),
    calibrated on no data / the run's synthetic set / as many real training images, both through
    `export-calib`; scored in ONNX Runtime on the CPU. One column per mode and calibration method of
    --modelopt (default INT8 entropy and max; also fp8:max, int4:awq_clip, int4:rtn_dq). Needs nvidia-modelopt
    (the `peers` extra) in this interpreter. A graph ONNX Runtime cannot run says so in its cell.
Rows 3-9 share the number of images, epochs and schedule (from --recipe). --rows picks rows;
finished runs in --out are reused, so extra rows can be added later.
--split val scores on the 5,000-image validation split carved from the training set (for
tuning the recipe); --split test is the reported number.

    python benchmarks/accuracy.py --recipe calib/fmnist-vit-fast.toml --seeds 0,1 --split test
    python benchmarks/accuracy.py --rows 1,14,15,16 --float-run /tmp/fast-w8a8 --seeds 0 \
        --modelopt int8:entropy,int8:max,fp8:max,int4:awq_clip,int4:rtn_dq
"""
import argparse
import ast
import dataclasses
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mimiq_deploy.calib import export_calib, graph_input_name
from mimiq_deploy.data import load_fmnist, normalize_uint8
from mimiq_deploy.finetune import finetune, load_finetune_recipe, ptq_student
from mimiq_deploy.models import load_model
from mimiq_deploy.quant import parse_bits
from mimiq_deploy.quant.student import load_student
from mimiq_deploy.run_dir import FLOAT_ONNX, RunDir
from mimiq_deploy.synthesize import load_synthesis_recipe, load_synthetic, save_image_set, synthesize
from mimiq_deploy.teacher import TeacherRecipe, accuracy

ROWS = ["1 teacher (FP32)", "2 PTQ on MimiQ images", "3 noise + KL", "4 base synthesis + KL",
        "5 MimiQ + KL", "6 MimiQ + KL + HAD", "7 real data + KL + HAD",
        "8 MimiQ + patch entropy + KL + HAD", "9 MimiQ + KL + token-weighted HAD",
        "10 MimiQ + MaskAQ synthesis terms + KL + HAD", "11 full MaskAQ (+ token-weighted HAD, refresh)",  # 8-11: MaskAQ
        "12 PTQ on Gaussian noise", "13 PTQ on real images",  # 12-13: the sceptic's baselines
        "14 ModelOpt, no calibration data", "15 ModelOpt on MimiQ images (export-calib)",
        "16 ModelOpt on real images (export-calib)"]  # 14-16: a peer quantizer on the float graph
MODELOPT_ROWS = ROWS[13:16]
MODELOPT_COLUMNS = "int8:entropy,int8:max"  # mode:calibration method
PATCH_ENTROPY = 1.0  # rows 8, 10, 11: same magnitude as L_IHC on the default (a 32-image probe kept teacher top-1 100 %)
MASKAQ_SYNTHESIS = {"patch_entropy": PATCH_ENTROPY, "mask_align": 1.0}  # rows 10, 11 (alignment ~0.6 at W4A4 PTQ)
MASKAQ_REFRESH = {"refresh_every": 4, "refresh_fraction": 0.5}  # row 11: half the set renewed after epoch 4 of 8
# Scoring runs where synthesis and fine-tuning run: 10,000 test images take ~40 s per student on one CPU thread.
EVAL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_overrides(spec: str) -> dict:
    """`key=value,...` of recipe overrides; commas inside [...] belong to a list value (milestones=[2,3])."""
    pairs = (kv.split("=", 1) for kv in re.split(r",(?![^\[]*\])", spec) if kv)
    return {k.strip(): ast.literal_eval(v) for k, v in pairs}


def eval_split(split: str, cfg: dict):
    """Normalized images and labels of the test split, or of the teacher recipe's validation split."""
    if split == "test":
        x, y = load_fmnist("test")
    else:
        x, y = load_fmnist("train")
        r = TeacherRecipe()
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(r.seed))[:r.val_size]
        x, y = x[idx], y[idx]
    return normalize_uint8(x, cfg["mean"], cfg["std"]), y


def real_images(n: int, seed: int, cfg: dict):
    """n real training images from outside the validation split."""
    x, y = load_fmnist("train")
    r = TeacherRecipe()
    pool = torch.randperm(len(x), generator=torch.Generator().manual_seed(r.seed))[r.val_size:]
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]]
    return normalize_uint8(x[pick], cfg["mean"], cfg["std"]), y[pick]


def maskaq_set(teacher, model_name: str, recipe_path, seed: int, bits: str, mimiq_dir: Path, out_dir: Path):
    """Rows 10-11's set: MaskAQ synthesis against the PTQ student of `bits` calibrated on the MimiQ set.

    Returns (directory, seconds, synthesis recipe)."""
    recipe = load_synthesis_recipe(recipe_path, {"seed": seed, **MASKAQ_SYNTHESIS})
    calib = load_finetune_recipe(recipe_path, {}).calib_images
    student = ptq_student(teacher, parse_bits(bits), load_synthetic(mimiq_dir)[0][:calib])
    manifest = synthesize(teacher, model_name, out_dir, recipe, student=student,
                          student_tag=f"{bits} PTQ on {mimiq_dir.name}")
    return out_dir, synthesis_seconds(manifest), recipe


def synthesis_seconds(manifest) -> float:
    """A set's synthesis time from its manifest's measured rate (also right for a set reused from an earlier run)."""
    rate = manifest.images_steps_per_s
    return manifest.recipe["num_images"] * manifest.recipe["steps"] / rate if rate else 0.0


def modelopt_ptq(float_graph: Path, calib, mode: str, method: str, out: Path,
                 high_precision: str | None = None) -> tuple[float, str | None]:
    """ModelOpt's ONNX PTQ through its own CLI, its defaults but the mode, the calibration method (and the CPU to
    calibrate on); calib: an export-calib npz, or None (ModelOpt then calibrates on random data); high_precision:
    its --high_precision_dtype (default FP16). Returns the seconds and why it failed (None when it did not)."""
    cmd = [sys.executable, "-m", "modelopt.onnx.quantization", "--onnx_path", str(float_graph),
           "--quantize_mode", mode, "--calibration_method", method, "--calibration_eps", "cpu",
           "--output_path", str(out)] + (["--calibration_data_path", str(calib)] if calib else []) \
        + (["--high_precision_dtype", high_precision] if high_precision else [])
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:  # the table says so; the other columns still run
        print(f"ModelOpt failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}", file=sys.stderr)
        return time.time() - t0, f"ModelOpt fails: {(done.stderr.strip().splitlines() or ['?'])[-1][-120:]}"
    return time.time() - t0, None


def ort_top1(graph: Path, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float | str:
    """Top-1 (%) of an ONNX graph in ONNX Runtime on the CPU, or why ONNX Runtime cannot run it."""
    try:
        sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
        sess.run(None, {sess.get_inputs()[0].name: x[:1]})
    except Exception as e:  # noqa: BLE001 - ORT's own errors (a graph it refuses): the table says which
        return f"ORT fails: {str(e).splitlines()[0][-120:]}"
    name = sess.get_inputs()[0].name
    correct = sum(int((sess.run(None, {name: x[i:i + batch_size]})[0].argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def modelopt_table(rows, float_run: Path, out: Path, seed: int, cfg: dict, x_eval, y_eval, teacher_top1,
                   split: str, columns: list[tuple[str, str]]) -> list[str]:
    """Rows 14-16: ModelOpt's PTQ of float_run's float graph, per (mode, calibration method); the table's lines."""
    float_graph = RunDir(float_run).graph(FLOAT_ONNX)
    out.mkdir(parents=True, exist_ok=True)
    mimiq = export_calib(float_run, "npz", out / "mimiq.npz")[0]
    manifest = RunDir(float_run).read_manifest()
    n = manifest.recipe["num_images"]
    save_image_set(out / "real", manifest.model, *real_images(n, seed, cfg), kind="real", data_cfg=cfg)
    real, record = export_calib(out / "real", "npz", out / "real.npz")
    if record.input_name != graph_input_name(float_run):
        sys.exit(f"{real} is keyed {record.input_name!r}, {float_graph} takes {graph_input_name(float_run)!r}")
    x, y = x_eval.cpu().numpy().astype(np.float32), y_eval.cpu().numpy()
    calib = {MODELOPT_ROWS[0]: None, MODELOPT_ROWS[1]: mimiq, MODELOPT_ROWS[2]: real}
    names = [f"{mode.upper()} {method}" for mode, method in columns]
    lines = [f"ModelOpt PTQ of {float_graph}: Fashion-MNIST {split} top-1 (%) in ONNX Runtime (CPU); "
             f"calibration sets of {n} images, the MimiQ one the run's own, the real one seed {seed}", "",
             "| row | " + " | ".join(names) + " | ModelOpt s (" + " / ".join(names) + ") |",
             "|---|" + "---|" * (len(names) + 1)]
    if ROWS[0] in rows:
        lines.append(f"| {ROWS[0]} | " + " | ".join(f"{teacher_top1:.2f}" for _ in names) + " | - |")
    fp32 = ort_top1(float_graph, x, y)
    lines.append("| the float graph (FP32, ONNX Runtime) | " + " | ".join(f"{fp32:.2f}" for _ in names) + " | - |")
    for row in (r for r in MODELOPT_ROWS if r in rows):
        cells, secs = [], []
        for mode, method in columns:
            graph = out / f"{row.split()[0]}-{mode}-{method}.onnx"
            seconds, failed = modelopt_ptq(float_graph, calib[row], mode, method, graph)
            secs.append(seconds)
            top1 = failed or ort_top1(graph, x, y)
            cells.append(f"{top1:.2f}" if isinstance(top1, float) else top1)
            print(f"{row} ({mode} {method}): {cells[-1]}", flush=True)
        lines.append(f"| {row} | " + " | ".join(cells) + " | " + " / ".join(f"{t:.0f}" for t in secs) + " |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="fmnist-vit", choices=["fmnist-vit", "fmnist-swin"])
    ap.add_argument("--recipe", default=None, help="default: calib/<model>-fast.toml")
    ap.add_argument("--bits", default="w3a3,w4a4,w4a8,w8a8")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", default="1,12,13,2,3,4,5,6,7",
                    help="Row numbers to run (8-11: MaskAQ options; 12, 13: PTQ on noise / real images).")
    ap.add_argument("--split", choices=["test", "val"], default="test")
    ap.add_argument("--out", default="runs/benchmark")
    ap.add_argument("--results", default=None, help="Also write the table (and this command) to this Markdown file.")
    ap.add_argument("--modelopt", default=MODELOPT_COLUMNS,
                    help="rows 14-16: ModelOpt's columns, mode:calibration method (int8:entropy, int8:max, fp8:max, "
                         "int4:awq_clip, int4:rtn_dq)")
    ap.add_argument("--float-run", default=None, help="Rows 14-16: the quantize run whose export/model_fp32.onnx and "
                    "synthetic set ModelOpt quantizes and calibrates on.")
    args = ap.parse_args()
    args.recipe = args.recipe or f"calib/{args.model}-fast.toml"
    teacher = load_model(args.model)
    cfg = teacher.pretrained_cfg
    x_eval, y_eval = (t.to(EVAL_DEVICE) for t in eval_split(args.split, cfg))
    seeds = [int(s) for s in args.seeds.split(",")]
    bits_list = args.bits.split(",")
    rows = [ROWS[int(i) - 1] for i in args.rows.split(",")]
    rows = [ROWS[0]] + [r for r in rows if r != ROWS[0]] if ROWS[0] in rows else rows  # the teacher row first
    peer_rows = [r for r in rows if r in MODELOPT_ROWS]  # their own table: no bit setting, no seeds
    rows = [r for r in rows if r not in MODELOPT_ROWS]
    if peer_rows and not args.float_run:
        ap.error("rows 14-16 need --float-run RUN (a `mimiq-deploy quantize` run directory)")
    results = {(row, b): [] for row in rows for b in bits_list}
    seconds = {row: 0.0 for row in rows}
    teacher_top1 = accuracy(teacher.to(EVAL_DEVICE), x_eval, y_eval)
    out = Path(args.out)
    plan = [(ROWS[1], "mimiq", {"epochs": 0}), (ROWS[2], "noise", {"had": False}),
            (ROWS[3], "base", {"had": False}), (ROWS[4], "mimiq", {"had": False}),
            (ROWS[5], "mimiq", {}), (ROWS[6], "real", {}), (ROWS[7], "entropy", {}),
            (ROWS[8], "mimiq", {"had_token_weight": True}), (ROWS[9], "maskaq", {}),
            (ROWS[10], "maskaq", {"had_token_weight": True, **MASKAQ_REFRESH}),
            (ROWS[11], "noise", {"epochs": 0}), (ROWS[12], "real", {"epochs": 0})]
    plan = [p for p in plan if p[0] in rows]
    kinds = {kind for _, kind, _ in plan}
    if "maskaq" in kinds:
        kinds.add("mimiq")  # the PTQ student that MaskAQ synthesis aligns with is calibrated on it
    for seed in seeds if plan else []:  # the teacher row and rows 14-16 need no student
        synth = {}
        for kind, overrides in (("mimiq", {}), ("base", {"ihc": False}), ("noise", {"noise_only": True}),
                                ("entropy", {"patch_entropy": PATCH_ENTROPY})):
            if kind not in kinds:
                continue
            recipe = load_synthesis_recipe(args.recipe, {"seed": seed, **overrides})
            synth[kind] = out / f"{kind}-s{seed}"
            synth[kind + "_seconds"] = synthesis_seconds(synthesize(teacher, args.model, synth[kind], recipe))
        n = load_synthesis_recipe(args.recipe, {}).num_images
        synth["real"] = out / f"real-s{seed}"
        save_image_set(synth["real"], args.model, *real_images(n, seed, cfg), kind="real", data_cfg=cfg)
        synth["real_seconds"] = 0.0
        for bits in bits_list:
            if "maskaq" in kinds:
                synth["maskaq"], synth["maskaq_seconds"], maskaq_recipe = maskaq_set(
                    teacher, args.model, args.recipe, seed, bits, synth["mimiq"], out / f"maskaq-s{seed}-{bits}")
            for row, kind, overrides in plan:
                run = out / f"{kind}-s{seed}-{bits}-{row.split()[0]}"
                RunDir(run).link_synthetic(synth[kind])
                recipe = load_finetune_recipe(args.recipe, {"seed": seed, **overrides})
                t0 = time.time()
                finetune(teacher, args.model, None, run, parse_bits(bits), recipe,
                         synth_recipe=maskaq_recipe if kind == "maskaq" else None)
                share = synth[kind + "_seconds"] if kind == "maskaq" else synth[kind + "_seconds"] / len(bits_list)
                if kind == "maskaq":  # plus its share of the MimiQ set its PTQ student was calibrated on
                    share += synth["mimiq_seconds"] / len(bits_list)
                seconds[row] += time.time() - t0 + share
                results[(row, bits)].append(accuracy(load_student(run / "student.pt").to(EVAL_DEVICE), x_eval, y_eval))
                print(f"seed {seed} {bits} {row}: {results[(row, bits)][-1]:.2f}", flush=True)
    runs = len(seeds) * len(bits_list)
    student_table = plan or not peer_rows  # rows 14-16 alone: only their table
    lines = [] if not student_table else [f"Fashion-MNIST {args.split} top-1 (%), mean ± std over seeds {seeds}; recipe {args.recipe}", "",
             "| row | " + " | ".join(b.upper() for b in bits_list) + " | wall s / run |",
             "|---|" + "---|" * (len(bits_list) + 1)]
    if ROWS[0] in rows and student_table:
        lines.append(f"| {ROWS[0]} | " + " | ".join(f"{teacher_top1:.2f}" for _ in bits_list) + " | - |")
    for row in rows[1:] if ROWS[0] in rows else rows:
        cells = []
        for b in bits_list:
            v = results[(row, b)]
            cells.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {seconds[row] / runs:.0f} |")
    if peer_rows:
        lines += ([""] if lines else []) + modelopt_table(rows[:1] + peer_rows, Path(args.float_run), out / "modelopt",
                                                         seeds[0], cfg, x_eval, y_eval, teacher_top1, args.split,
                                                         [tuple(c.split(":")) for c in args.modelopt.split(",")])
    lines += ["", (f"{len(seeds) * len(bits_list)} runs per row; wall s / run includes the row's share of its synthesis; "
               if student_table else "") + f"{torch.get_num_threads()} CPU threads"
              + (f", {torch.cuda.get_device_name(0)}" if EVAL_DEVICE.type == "cuda" else "")
              + f", torch {torch.__version__}.",
              "", "Regenerate: `python benchmarks/accuracy.py " + " ".join(sys.argv[1:]) + "`"]
    print("\n".join(lines))
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
