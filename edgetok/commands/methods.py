"""`edgetok methods`: the registered reduction methods and their parameters."""
import click


@click.command()
def methods():
    """List the reduction methods `edgetok export --method` takes, with their parameters."""
    import inspect

    from ..reduce.registry import get_method
    from .. import methods as registered

    for name, summary in registered().items():
        params = [p for p in inspect.signature(get_method(name).build).parameters
                  if p not in ("depth", "tokens", "protect", "model")]
        click.echo(f"{name:12s} {summary}")
        click.echo(f"{'':12s} parameters: {', '.join(params) or 'none'}")
    return 0
