"""`edgetok serve`: an export directory behind NVIDIA Triton Inference Server (PyTriton)."""
import signal

import click


@click.command()
@click.argument("path", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback unless told otherwise)")
@click.option("--port", type=int, default=8000, show_default=True, help="HTTP port")
@click.option("--grpc-port", type=int, help="default: --port + 1")
@click.option("--metrics-port", type=int, help="default: --port + 2")
@click.option("--max-batch", type=int, default=8, show_default=True, help="largest batch Triton forms")
@click.option("--instances", type=int, default=1, show_default=True, help="model instances (one Session each)")
@click.option("--backend", type=click.Choice(["ort-cpu", "ort-cuda", "trt", "openvino"]),
              help="default: best available (openvino: float32, docs/openvino.md)")
@click.option("--queue-delay-us", type=int, default=100, show_default=True, help="dynamic batching delay")
@click.option("--name", help="model name (default: the export's, as `edgetok triton` names it)")
@click.option("--threads", type=int, help="intra-op threads per instance (ONNX Runtime)")
@click.option("--log-file", type=click.Path(), help="Triton's log file (default: stdout)")
@click.option("--startup-timeout", type=float, default=300.0, show_default=True,
              help="seconds to wait for Triton and the model to be ready (a saturated CPU needs more)")
def serve(path, host, port, grpc_port, metrics_port, max_batch, instances, backend, queue_delay_us, name, threads,
          log_file, startup_timeout):
    """Serve PATH (export directory or engine) with dynamic batching until SIGINT/SIGTERM."""
    from ..serve.server import ServeConfig, Server

    cfg = ServeConfig(host=host, port=port, grpc_port=grpc_port, metrics_port=metrics_port, max_batch=max_batch,
                      instances=instances, backend=backend, queue_delay_us=queue_delay_us, name=name,
                      threads=threads, log_file=log_file, startup_timeout_s=startup_timeout)
    server = Server(path, cfg)
    click.echo(f"loaded {path}: {instances} x {server.sessions[0].backend}, input {server.input.name} "
               f"{server.input.shape}", err=True)

    def interrupt(*_):  # SIGTERM while starting: stop what has started (start() cleans up on KeyboardInterrupt)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        server.start()
    except KeyboardInterrupt:
        click.echo("stopped while starting", err=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    urls = server.urls
    again = ", relaunched once" if server.launches > 1 else ""
    click.echo(f"serving model {server.name!r}: http {urls['http']}  grpc {urls['grpc']}  metrics {urls['metrics']}"
               f"  (ready in {server.startup_s:.1f} s{again})", err=True)
    server.serve_forever()
    click.echo("stopped", err=True)
    return 0
