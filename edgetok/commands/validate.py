"""`edgetok validate`: latency against a budget, parity, reduced vs unreduced."""
import json

import click


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--backend", type=click.Choice(["ort-cpu", "ort-cuda", "trt", "torch", "openvino", "openvino-bf16"]),
              help="default: best available (openvino: float32; openvino-bf16 only when asked, docs/openvino.md)")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), help="p99 latency budget; exit code 1 when missed")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--baseline", type=click.Path(exists=True), help="the unreduced export, measured in the same run")
@click.option("--torch-model", type=click.Path(exists=True), help="torch model (.pt2 / pickled .pt) for parity")
@click.option("--atol", type=float, default=1e-4, show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="write the JSON report here")
def validate(path, backend, budget_ms, batch, runs, warmup, baseline, torch_model, atol, report_path):
    """Measure PATH's latency (p50/p90/p99, throughput) on one backend."""
    from pathlib import Path

    from ..runtime.backends import load_torch_module
    from ..validate import validate as run

    module = load_torch_module(Path(torch_model)) if torch_model else None
    r = run(path, backend, budget_ms, batch, runs, warmup, baseline, module, atol, report_path)
    lat = r["model"]["latency"]
    click.echo(f"{r['model']['backend']} batch {batch}: p50 {lat['p50_ms']:.3f} ms  p90 {lat['p90_ms']:.3f} ms  "
               f"p99 {lat['p99_ms']:.3f} ms  {lat['throughput']:.1f} img/s")
    if "speedup" in r:
        click.echo("vs baseline: " + json.dumps({k: (round(v, 3) if v else v) for k, v in r["speedup"].items()}))
    if "max_abs" in r.get("parity", {}):
        click.echo(f"parity vs torch: max abs {r['parity']['max_abs']:.2e} ({'ok' if r['parity']['ok'] else 'FAILED'})")
    if report_path:
        click.echo(f"report: {report_path}")
    if not r["passed"]:
        click.echo(f"FAILED: {r['failure']}", err=True)
        return 1
    return 0
