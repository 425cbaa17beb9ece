"""``edgetok inspect``: what an exported model holds (edgetok nodes, attributes, tokens, bodies)."""
from __future__ import annotations

import click


@click.command()
@click.argument("model", type=click.Path(exists=True), metavar="MODEL.onnx|DIR")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(model, as_json):
    """Summarise an exported ONNX model: opsets, inputs/outputs, every edgetok node with its
    attributes and token counts, and whether the function bodies are present."""
    import json

    from rich.console import Console
    from rich.table import Table

    from ..export.inspect import summarize

    s = summarize(model)
    if as_json:
        click.echo(json.dumps(s, indent=2))
        return 0
    console = Console()
    console.print(f"[bold]{s['path']}[/]  ({s['producer']}, {s['nodes']} nodes)")
    console.print("opsets: " + ", ".join(f"{d} {v}" for d, v in s["opsets"].items()))
    for kind in ("inputs", "outputs"):
        console.print(f"{kind}: " + ", ".join(f"{v['name']} {v['shape']}" for v in s[kind]))
    console.print(f"form: {s['form']}")
    if s["edgetok_nodes"]:
        table = Table("op", "tokens in -> out", "attributes", "plugin", "body")
        for n in s["edgetok_nodes"]:
            a = dict(n["attributes"])
            plugin = f"{a.pop('plugin_namespace', '-')} v{a.pop('plugin_version', '-')}"
            table.add_row(n["op_type"], f"{n['tokens_in']} -> {n['tokens_out']}",
                          ", ".join(f"{k}={v}" for k, v in a.items()), plugin, "yes" if n["body"] else "no")
        console.print(table)
    if s["manifest"]:
        console.print(f"manifest: {s['manifest']}")
    return 0
