"""The `mimiq-deploy` command line: a thin layer over the Python API, one verb per stage."""
import json
import sys
from pathlib import Path

import click

from .errors import MimiqError

model_option = click.option("--model", "model_name", default="fmnist-vit", show_default=True,
                            help="fmnist-vit or fmnist-swin (embedded), or a timm ViT / DeiT / Swin model name.")
checkpoint_option = click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
                                 help="Weights for a timm model (a state dict or a checkpoint with a 'model' key; "
                                      ".pt / .pth, or .safetensors), or, with fmnist-vit / fmnist-swin, a checkpoint written by "
                                      "`mimiq-deploy teacher train`.")
trust_option = click.option("--trust-checkpoint", "trust", is_flag=True,
                            help="Unpickle the checkpoint fully, the old way. Only for files from a trusted source: "
                                 "unpickling can run code. Without it, a checkpoint needing more than tensors and "
                                 "plain values is refused.")

recipe_option = click.option("--recipe", type=click.Path(path_type=Path), default=None,
                             help="Calibration recipe TOML (default: calib/<model>.toml when present, "
                                  "else built-in values).")


class Cli(click.Group):
    """Turns MimiqError into one line on stderr and exit status 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MimiqError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted: run the same command again to resume where it stopped", err=True)
            sys.exit(130)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mimiq-deploy")
def main():
    """Data-free quantization of Vision Transformers (MimiQ), deployed to ONNX Runtime and TensorRT."""


@main.command()
@model_option
@checkpoint_option
@trust_option
@click.option("--bits", default="w4a8", show_default=True, help="wXaY (X-bit weights, Y-bit activations) or fp8 (E4M3).")
@click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@recipe_option
@click.option("--preset", type=click.Choice(["fast"]), default=None,
              help="fast: a CPU-sized run of the embedded default (minutes, not hours).")
@click.option("--export-config", type=click.Path(path_type=Path), default=None, help="Deployment config TOML.")
@click.option("--val-dir", type=click.Path(path_type=Path), help="ImageNet-style folder for verify.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--verify-limit", type=int, default=None, help="Verify on the first N eval images only.")
@click.option("--dry-run", is_flag=True, help="Print the resolved recipe and export config, run nothing.")
def quantize(model_name, checkpoint, trust, bits, run_dir, recipe, preset, export_config, val_dir, data_dir,
             verify_limit, dry_run):
    """Everything: synthesize, finetune, export, build, verify, bench, report (resumable)."""
    from .quant import parse_bits
    from .quantize import describe_plan, preset_recipe, quantize as run
    from .report import format_summary

    parse_bits(bits)  # refuse a bad setting before any work
    recipe_path = preset_recipe(preset, model_name, recipe)
    if dry_run:
        click.echo(describe_plan(recipe_path, export_config))
        return
    report = run(model_name, checkpoint, bits, run_dir, recipe_path, export_config,
                 val_dir, data_dir, verify_limit, echo=click.echo, trust=trust)
    click.echo("")
    click.echo(format_summary(report))
    click.echo(f"\nreport: {Path(run_dir) / 'report.md'}")
    if report.verify and report.verify.failed:
        raise MimiqError(f"below the verify thresholds: {', '.join(report.verify.failed)}")


@main.command("eval")
@model_option
@checkpoint_option
@trust_option
@click.option("--val-dir", type=click.Path(path_type=Path), help="ImageNet-style folder of synset subfolders.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(model_name, checkpoint, trust, val_dir, data_dir, batch_size, as_json):
    """Top-1 accuracy of a model on its eval set."""
    from .evaluate import eval_dataset, evaluate
    from .models import load_model

    model = load_model(model_name, checkpoint, trust=trust)
    dataset, dataset_name = eval_dataset(model, val_dir, data_dir)
    result = evaluate(model, dataset, batch_size, progress=not as_json)
    result.dataset = dataset_name
    if as_json:
        click.echo(json.dumps({"model": model_name, **result.to_json()}))
    else:
        click.echo(f"{model_name} on {dataset_name}: top-1 {result.top1:.2f}% over {result.n} images")



@main.command()
@model_option
@checkpoint_option
@trust_option
@click.option("--out", "run_dir", type=click.Path(path_type=Path), required=True, help="Run directory.")
@click.option("--num-images", type=int, default=None, help="Images to synthesize.")
@click.option("--batch-size", type=int, default=None, help="Images per optimization batch (= per shard).")
@click.option("--steps", type=int, default=None, help="Optimization steps per batch.")
@click.option("--seed", type=int, default=None)
@recipe_option
@click.option("--no-ihc", is_flag=True, help="Base synthesis: CE + TV only (ablation).")
@click.option("--noise-only", is_flag=True, help="Plain Gaussian noise, no optimization (ablation).")
@click.option("--patch-entropy", type=float, default=None,
              help="MaskAQ option: weight of the patch-similarity entropy bonus (0: off).")
@click.option("--mask-align", type=float, default=None,
              help="MaskAQ option: weight of masked attention alignment with --align-student (0: off).")
@click.option("--align-student", type=click.Path(path_type=Path), default=None,
              help="student.pt to align with (a PTQ student: `mimiq-deploy finetune --epochs 0`).")
def synthesize(model_name, checkpoint, trust, run_dir, num_images, batch_size, steps, seed, recipe, no_ihc, noise_only,
               patch_entropy, mask_align, align_student):
    """MimiQ synthetic calibration images (resumable, shards split across torchrun ranks)."""
    from .models import load_model
    from .config import resolve_recipe_path
    from .synthesize import load_synthesis_recipe, synthesize as run

    r = load_synthesis_recipe(resolve_recipe_path(recipe, model_name),
                              dict(num_images=num_images, batch_size=batch_size, steps=steps, seed=seed,
                                   ihc=False if no_ihc else None, noise_only=True if noise_only else None,
                                   patch_entropy=patch_entropy, mask_align=mask_align))
    student = tag = None
    if align_student is not None:
        from .quant.student import load_student
        student = load_student(align_student, trust=trust)
        if student.model_name != model_name:
            raise MimiqError(f"{align_student} is a student of {student.model_name!r}, not of {model_name!r}")
        tag = f"{student.quant_config.name} student {Path(align_student).resolve()}"
    manifest = run(load_model(model_name, checkpoint, trust=trust), model_name, run_dir, r, student=student,
                   student_tag=tag)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in manifest.final_losses.items())
    click.echo(f"synthesized {manifest.num_images_done} {manifest.kind} images in {run_dir} ({losses})")


@main.command()
@model_option
@checkpoint_option
@trust_option
@click.option("--data", "run_dir", type=click.Path(path_type=Path), required=True,
              help="Run directory holding the synthetic images.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
              help="Where student.pt goes (default: the --data run directory).")
@click.option("--bits", default="w4a8", show_default=True, help="wXaY (X-bit weights, Y-bit activations) or fp8 (E4M3).")
@click.option("--epochs", type=int, default=None, help="0 = calibration only (PTQ).")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--gamma", type=float, default=None, help="L_HAD weight.")
@click.option("--no-had", is_flag=True, help="KL only (ablation).")
@click.option("--had-token-weight", is_flag=True, help="MaskAQ option: weigh tokens in L_HAD by the teacher's CLS attention.")
@click.option("--refresh-every", type=int, default=None,
              help="MaskAQ option: every K epochs, synthesize part of the set anew against the current student, "
                   "as the set was made (0: off).")
@click.option("--refresh-fraction", type=float, default=None, help="Share of the set renewed per refresh.")
@click.option("--seed", type=int, default=None)
@recipe_option
def finetune(model_name, checkpoint, trust, run_dir, out_dir, bits, epochs, batch_size, lr, gamma, no_had,
             had_token_weight, refresh_every, refresh_fraction, seed, recipe):
    """Head-distilled QAT of the fake-quant student (resumes after an interruption)."""
    from .finetune import finetune as run, load_finetune_recipe
    from .models import load_model
    from .quant import parse_bits
    from .config import resolve_recipe_path
    from .run_dir import RunDir

    cfg = parse_bits(bits)
    r = load_finetune_recipe(resolve_recipe_path(recipe, model_name),
                             dict(epochs=epochs, batch_size=batch_size, lr=lr, gamma=gamma, seed=seed,
                                  had=False if no_had else None, had_token_weight=True if had_token_weight else None,
                                  refresh_every=refresh_every, refresh_fraction=refresh_fraction))
    out = RunDir(out_dir or run_dir)
    if out.root != run_dir:
        out.link_synthetic(run_dir)  # a new run directory reuses the synthetic set, not copies it
    record = run(load_model(model_name, checkpoint, trust=trust), model_name, checkpoint, out, cfg, r)
    click.echo(f"student {cfg.name} written to {out.student} "
               f"({len(record.history)} epochs, {record.train_minutes:.1f} min)")


run_dir_argument = click.argument("run_dir", type=click.Path(path_type=Path))


@main.command()
@run_dir_argument
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="Deployment config TOML (export/default.toml holds the defaults).")
@trust_option  # for the teacher checkpoint that student.pt names
def export(run_dir, config_path, trust):
    """Fold the student's learned scales into ONNX QDQ graphs (ORT FP32, TensorRT FP16)."""
    from .export import export_student, load_export_config
    from .quant.student import load_student
    from .run_dir import RunDir

    rd = RunDir(run_dir)
    export_student(load_student(rd.require_student(), trust=trust), rd, load_export_config(config_path),
                   progress=click.echo)
    for note in rd.read_export().notes.values():
        click.echo(note)


@main.command("export-calib")
@run_dir_argument
@click.option("--format", "fmt", default="npz", show_default=True,
              help="npz (keyed by the graph's input name; ModelOpt's --calibration_data_path) or npy (the bare array).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The array file (default: RUN/calib/calib.<format>); its JSON record goes beside it (<out>.json).")
@click.option("--limit", type=int, default=None, help="The first N images only.")
def export_calib_cmd(run_dir, fmt, out, limit):
    """The synthetic set as a calibration file for other quantizers (ModelOpt, ONNX Runtime, NNCF): float32
    images in the exported graph's input space, plus the preprocessing and the labels they were made for."""
    from .calib import export_calib

    path, record = export_calib(run_dir, fmt, out, limit)
    click.echo(f"wrote {path}: {record.shape[0]} images {record.dtype} {tuple(record.shape)} as "
               f"{record.input_name!r}; preprocessing and labels in {path.name}.json")


@main.command()
@click.argument("onnx_path", type=click.Path(path_type=Path))
@click.option("--target", required=True, help="A back end: onnxruntime, tensorrt, openvino.")
@click.option("--json", "as_json", is_flag=True, help="Violations and the target's analysis as one JSON object.")
def check(onnx_path, target, as_json):
    """Static conformance of a QDQ graph with what the target engine runs, then the target's performance verdict
    (e.g. which attention blocks TensorRT fuses), which is not a violation."""
    from .check import check_graph, graph_analysis
    from .onnx_graph import read_onnx

    model = read_onnx(onnx_path)
    violations = check_graph(model, target)
    analysis, lines = graph_analysis(model, target)
    if as_json:
        click.echo(json.dumps({"graph": str(onnx_path), "target": target, "violations": violations,
                               "analysis": analysis}, indent=2))
    else:
        click.echo("\n".join(violations + ([] if violations else [f"{onnx_path}: conforms to {target}"]) + lines))
    if violations:
        raise MimiqError(f"{onnx_path}: {len(violations)} violation(s) for {target}")


@main.command("build")
@run_dir_argument
@click.option("--encoding", type=click.Choice(["auto", "int8", "uint8"]), default="auto", show_default=True,
              help="8-bit encoding of the ONNX Runtime graph. auto: `ort_int8` of the export config if set, else "
                   "int8 / zero point 0 on CPUs with VNNI or ARM dot product, uint8 / zero point 128 elsewhere "
                   "(env MIMIQ_CPU_VNNI=0/1 overrides the detection).")
@click.option("--backend", "backends", multiple=True, metavar="NAME",
              help="Build only this back end (repeatable; default: all): onnxruntime, tensorrt, openvino, pytorch.")
def build_cmd(run_dir, encoding, backends):
    """ONNX Runtime sessions, TensorRT engines, OpenVINO and PyTorch artifacts from the exported graphs, plus the
    model repository."""
    from .build import build

    build(run_dir, progress=click.echo, backends=backends, encoding=encoding)


@main.command("verify")
@run_dir_argument
@click.option("--val-dir", type=click.Path(path_type=Path), help="ImageNet-style folder of synset subfolders.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--limit", type=int, default=None, help="Verify on the first N eval images only.")
@click.option("--json", "as_json", is_flag=True)
@trust_option  # for the teacher checkpoint that student.pt names
def verify_cmd(run_dir, val_dir, data_dir, limit, as_json, trust):
    """Deployed artifacts vs the fake-quant student: agreement, cosine, max error, accuracy."""
    from .run_dir import RunDir
    from .verify import format_verify, verify

    rd = RunDir(run_dir)
    report = verify(rd, val_dir, data_dir, limit, progress=not as_json, trust=trust)
    record = rd.read_verify()
    click.echo(json.dumps(report) if as_json else format_verify(record))
    if record.failed:
        raise MimiqError(f"below the verify thresholds: {', '.join(record.failed)}")


@main.command("bench")
@run_dir_argument
@click.option("--batch", default=None, help="Comma-separated batch sizes (default: from the export config).")
@click.option("--json", "as_json", is_flag=True)
def bench_cmd(run_dir, batch, as_json):
    """Latency p50/p90/p99 and throughput of each artifact and its float twin."""
    from .bench import bench, format_bench
    from .export import stored_export_config
    from .run_dir import RunDir

    rd = RunDir(run_dir)
    config = stored_export_config(rd.read_export()).bench
    try:
        sizes = [int(b) for b in batch.split(",")] if batch else config.batch_sizes
    except ValueError:
        raise MimiqError(f"--batch takes comma-separated integers, got {batch!r}") from None
    report = bench(rd, sizes, min_seconds=config.seconds, progress=(lambda m: None) if as_json else click.echo)
    click.echo(json.dumps(report) if as_json else format_bench(rd.read_bench()))


@main.command("inspect-attention")
@model_option
@checkpoint_option
@trust_option
@click.option("--data", "run_dirs", multiple=True, type=click.Path(path_type=Path),
              help="Run directory with synthetic images (repeatable).")
@click.option("--real/--no-real", default=True, show_default=True, help="Include real eval images.")
@click.option("--val-dir", type=click.Path(path_type=Path), help="ImageNet-style folder for the real images.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--num", type=int, default=512, show_default=True, help="Images per set.")
@click.option("--json", "as_json", is_flag=True)
def inspect_attention(model_name, checkpoint, trust, run_dirs, real, val_dir, data_dir, num, as_json):
    """Mean inter-head attention similarity (|SSIM|) of image sets."""
    import torch

    from .evaluate import eval_dataset
    from .models import load_model
    from .synthesize import load_synthetic, mean_inter_head_similarity

    model = load_model(model_name, checkpoint, trust=trust)
    rows = []  # (set, n, similarity)
    for run_dir in run_dirs:
        images, _, manifest = load_synthetic(run_dir)
        rows.append((f"{manifest.kind} ({run_dir})", min(num, len(images)), mean_inter_head_similarity(model, images[:num])))
    if real:
        dataset, name = eval_dataset(model, val_dir, data_dir)
        images = torch.stack([dataset[i][0] for i in range(min(num, len(dataset)))])
        rows.append((f"real ({name})", len(images), mean_inter_head_similarity(model, images)))
    if as_json:
        click.echo(json.dumps([{"set": s, "n": n, "similarity": sim} for s, n, sim in rows]))
        return
    width = max(len(s) for s, _, _ in rows) if rows else 10
    click.echo(f"{'images':<{width}}  {'n':>6}  mean inter-head |SSIM|")
    for s, n, sim in rows:
        click.echo(f"{s:<{width}}  {n:>6}  {sim:.4f}")


@main.group()
def teacher():
    """The embedded teachers (Fashion-MNIST ViT and Swin)."""


@teacher.command("train")
@click.option("--recipe", type=click.Path(path_type=Path), default=None,
              help="Teacher recipe TOML (default: calib/fmnist-vit-teacher.toml values).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Checkpoint to write (default: the embedded weights file).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Folder with the Fashion-MNIST IDX files.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epoch count.")
@click.option("--train-subset", type=int, default=None, help="Train on this many images (recipe search).")
def teacher_train(recipe, out, data_dir, epochs, train_subset):
    """Train an embedded teacher (resumes an interrupted run); the recipe's [arch] family picks which."""
    from .teacher import check_out_path, default_teacher_path, load_recipe, train_teacher
    from .zoo import embedded_name

    r = load_recipe(recipe)
    if epochs is not None:
        r.epochs = epochs
    if train_subset is not None:
        r.train_subset = train_subset
    out = check_out_path(out or default_teacher_path(r.arch))
    m = train_teacher(r, out, data_dir)
    click.echo(f"teacher: {m.params / 1e6:.2f} M params, val top-1 {m.val_top1:.2f}%, "
               f"test top-1 {m.test_top1:.2f}%, {m.train_minutes:.1f} min -> {out}")
    if out != default_teacher_path(r.arch):
        click.echo(f"use it with any verb: --model {embedded_name(r.arch)} --checkpoint {out}")



@main.command("serve")
@run_dir_argument
@click.option("--artifact", default=None,
              help="The built artifact to serve (build.json's name, e.g. ort-cpu-w8a8; default: the quantized one "
                   "`bench` measured fastest, else the first quantized one built).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP, gRPC and metrics "
              "endpoints listen on (0.0.0.0: every interface).")
@click.option("--http-port", type=int, default=8000, show_default=True, help="KServe v2 over HTTP.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="KServe v2 over gRPC.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics (/metrics).")
@click.option("--max-batch", type=int, default=None,
              help="Largest batch Triton forms or takes (default: max_batch of the export config).")
@click.option("--max-queue-delay-us", type=int, default=1000, show_default=True,
              help="How long Triton's dynamic batcher may hold a request to fill a batch.")
@click.option("--instances", type=int, default=1, show_default=True,
              help="Model instances, each running its own copy of the artifact (the CPU's threads shared out).")
def serve_cmd(run_dir, artifact, host, http_port, grpc_port, metrics_port, max_batch, max_queue_delay_us, instances):
    """Serve one built artifact through a Triton Inference Server (PyTriton): KServe v2 over HTTP and gRPC,
    dynamic batching, raw images preprocessed in the server; SIGINT / SIGTERM stop it gracefully."""
    from .serve import ServeOptions, serve

    options = ServeOptions(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                           max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances)
    sys.exit(serve(run_dir, artifact, options, echo=click.echo))
