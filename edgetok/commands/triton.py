"""`edgetok triton`: an NVIDIA Triton model repository for an export."""
import click


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--output", required=True, type=click.Path(), help="model repository directory")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True)
@click.option("--name", help="model name in the repository (default: the export's model)")
@click.option("--max-batch-size", type=int, help="default: the engine's profile max, else 8")
@click.option("--instances", type=int, default=1, show_default=True)
@click.option("--plugin-library", type=click.Path(), help="libedgetok plugins to ship (tensorrt backend)")
def triton(path, output, backend, name, max_batch_size, instances, plugin_library):
    """Write a Triton model repository for PATH."""
    from ..serve.triton import write_repository

    cfg = write_repository(path, output, backend, name, max_batch_size, instances, plugin_library)
    click.echo(f"wrote {cfg}")
    return 0
