"""`edgetok build`: a TensorRT engine for an export, or a device build script where TensorRT is missing."""
import click


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--config", "config", required=True, help="export config name or YAML path (e.g. jetson-orin-nano)")
@click.option("--output", type=click.Path(), help="where engine.plan/engine.json go (default: next to the ONNX)")
@click.option("--plugin-library", type=click.Path(), help="libedgetok plugins (default: edgetok.ops.plugins)")
@click.option("--timing-cache", type=click.Path(), help="TensorRT timing cache file (default: ~/.cache/edgetok)")
@click.option("--dla-core", type=int, help="build for this DLA core (GPU fallback for unsupported layers)")
@click.option("--force", is_flag=True, help="rebuild even when nothing changed")
def build(path, config, output, plugin_library, timing_cache, dla_core, force):
    """Build PATH (export dir or ONNX) into a TensorRT engine for CONFIG."""
    from ..trt import build as build_engine

    result = build_engine(path, config, output, plugin_library, timing_cache, force, dla_core)
    click.echo(result.message)
    if result.kind == "script":
        for variant, argv in result.manifest.get("trtexec", {}).items():
            click.echo(f"trtexec ({'TensorRT >= 11' if variant == 'strong' else 'TensorRT < 11'}): {' '.join(argv)}")
    return 0
