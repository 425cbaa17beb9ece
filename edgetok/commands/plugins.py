"""``edgetok plugins``: build the fused kernels / TensorRT plugins, and say where they are."""
from __future__ import annotations

import json

import click


@click.group()
def plugins():
    """Build and locate the plugins/ libraries (CUDA kernels, TensorRT plugins)."""


@plugins.command()
@click.option("--build-dir", type=click.Path(file_okay=False), help="Build folder (default: $EDGETOK_PLUGIN_DIR or build/plugins).")
@click.option("--arch", "archs", multiple=True, help="CUDA architecture, repeatable (default: 75 80 86 87 89 90).")
@click.option("--no-kernels", is_flag=True, help="Build only the CPU test library (no nvcc needed).")
@click.option("--no-trt", is_flag=True, help="Skip the TensorRT plugins even if TensorRT is found.")
@click.option("--tensorrt-root", type=click.Path(file_okay=False), help="TensorRT install prefix.")
@click.option("--jobs", "-j", type=int, help="Parallel build jobs (default: all cores).")
def build(build_dir, archs, no_kernels, no_trt, tensorrt_root, jobs):
    """Configure and build plugins/ with CMake; print what was built."""
    from ..ops import plugins as p

    res = p.build(build_dir, archs or None, kernels=not no_kernels, trt=not no_trt, tensorrt_root=tensorrt_root,
                  jobs=jobs)
    for kind in p.LIBRARIES:
        path = res.libraries.get(kind)
        click.echo(f"{kind:8s} {path if path else '(not built)'}")
    if not no_trt and not no_kernels and "trt" not in res.libraries:
        click.echo("TensorRT was not found, so the TensorRT plugins were not built (pass --tensorrt-root).", err=True)


@plugins.command()
@click.option("--trt", is_flag=True, help="The TensorRT plugin library instead of the kernels library.")
def path(trt):
    """Print the path of the built library (for --dynamicPlugins= or LD_PRELOAD)."""
    from ..ops import plugins as p

    click.echo(p.library_path("trt" if trt else "kernels"))


@plugins.command()
def info():
    """Report sources, build folder, built libraries, toolchain and GPU, as JSON."""
    from ..ops import plugins as p

    click.echo(json.dumps(p.info(), indent=2))
