"""The ``cerman`` command: ``cerman ctl`` for operators, ``router``/``worker`` for circus."""

import json
import os
import sys
import time

import click

from cerman import paths
from cerman.client import Client
from cerman.config import POOL_TYPES
from cerman.errors import CermanError


@click.group()
def main():
    """Container External Resources Manager."""


@main.command()
def router():
    """Run the router (started by circus as watcher cerman-router)."""
    from cerman.router import run

    sys.exit(run())


@main.command()
@click.argument("name")
def worker(name):
    """Run the worker of checkpoint NAME (started by circus as cerman-worker-NAME)."""
    from workers.worker import run

    sys.exit(run(name))


@main.group()
@click.option("--socket", "endpoint", default=None, metavar="ENDPOINT",
              help="Router endpoint [default: ipc://$CERMAN_RUN_DIR/cerman.sock].")
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="Seconds to wait for a reply.")
@click.pass_context
def ctl(context, endpoint, timeout):
    """Send a request to a running cerman."""
    endpoint = endpoint or paths.resolve().client_endpoint
    socket_path = endpoint[len("ipc://"):] if endpoint.startswith("ipc://") else None
    if socket_path and not os.path.exists(socket_path):
        run_dir = os.path.dirname(socket_path)
        raise click.ClickException(
            f"no cerman router socket at {socket_path}; start cerman with 'circusd circus.ini' "
            f"(with CERMAN_RUN_DIR={run_dir}), or pass --socket, and check it with "
            f"'circusctl --endpoint ipc://{run_dir}/circus.sock status'")
    context.obj = Client(endpoint, timeout=timeout)
    context.call_on_close(context.obj.close)


json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON document on stdout.")


def _call(context, as_json, method, *args, printer=None):
    client = context.find_object(Client)
    try:
        result = getattr(client, method)(*args)
    except CermanError as error:
        click.echo(f"cerman ctl: {error}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(result, indent=1, sort_keys=True))
    elif printer:
        printer(result)
    else:
        for key, value in result.items():
            click.echo(f"{key}: {value}")
    return result


def _print_status(result):
    one_checkpoint = "checkpoints" not in result
    if one_checkpoint:
        result = {"checkpoints": {result.get("checkpoint", "?"): result}}
    for error in result.get("config_errors", []):
        click.echo(f"invalid config: {error['message']}")
    for name, checkpoint in sorted(result.get("checkpoints", {}).items()):
        pid = checkpoint.get("pid") or "-"
        click.echo(f"{name}: {checkpoint.get('state')} (pid {pid})")
        if checkpoint.get("error"):
            click.echo(f"  error: {checkpoint['error']}")
        for ns_type, pool in sorted((checkpoint.get("pools") or {}).items()):
            line = (f"  {ns_type}: free {pool.get('free', 0)}, leased {pool.get('leased', 0)}, "
                    f"building {pool.get('building', 0)}, capacity {pool.get('capacity', 0)}")
            click.echo(line)
            if pool.get("disabled"):
                click.echo(f"    disabled: {pool['disabled']}")
            if pool.get("last_error"):
                click.echo(f"    last error: {pool['last_error']}")
        if one_checkpoint:
            for lease in checkpoint.get("lease_list") or []:
                held = _held_duration(lease["leased_at"])
                click.echo(f"  lease {lease['lease']} ({lease['type']}), {held}")


def _held_duration(timestamp):
    """Format how long ago ``timestamp`` (seconds since the epoch) was, for status."""
    if not timestamp:
        return "age unknown"
    seconds = max(0, int(time.time() - timestamp))
    if seconds < 120:
        return f"held {seconds} s"
    if seconds < 7200:
        return f"held {seconds // 60} min"
    return f"held {seconds // 3600} h"


@ctl.command()
@click.argument("name", required=False)
@json_option
@click.pass_context
def status(context, name, as_json):
    """Show workers and pools, for every checkpoint or only NAME."""
    _call(context, as_json, "status", name, printer=_print_status)


@ctl.command()
@click.argument("name")
@click.option("--type", "ns_type", required=True, type=click.Choice(POOL_TYPES),
              help="Namespace type to lease.")
@json_option
@click.pass_context
def get(context, name, ns_type, as_json):
    """Lease a ready namespace of checkpoint NAME."""
    _call(context, as_json, "get", name, ns_type)


@ctl.command()
@click.argument("lease")
@json_option
@click.pass_context
def put(context, lease, as_json):
    """Return the namespace of LEASE; it is destroyed and the pool refilled."""
    _call(context, as_json, "put", lease)


@ctl.command()
@click.argument("name")
@click.option("--capacity", required=True, type=click.IntRange(0),
              help="Number of free namespaces to keep ready.")
@click.option("--type", "ns_type", type=click.Choice(POOL_TYPES),
              help="Pool to resize [default: every pool of NAME].")
@json_option
@click.pass_context
def update(context, name, capacity, ns_type, as_json):
    """Resize the pools of checkpoint NAME (until its worker restarts)."""
    _call(context, as_json, "update", name, capacity, ns_type)


@ctl.group("checkpoint")
def checkpoint_group():
    """Extracted CRIU images of a checkpoint (reference counted)."""


@checkpoint_group.command("get")
@click.argument("name")
@json_option
@click.pass_context
def checkpoint_get(context, name, as_json):
    """Take a reference on the extracted images of NAME and print their directory."""
    _call(context, as_json, "checkpoint_get", name)


@checkpoint_group.command("put")
@click.argument("name")
@json_option
@click.pass_context
def checkpoint_put(context, name, as_json):
    """Drop a reference taken by checkpoint get."""
    _call(context, as_json, "checkpoint_put", name)


@ctl.command()
@json_option
@click.pass_context
def reload(context, as_json):
    """Re-read the config directory: start, stop and restart workers to match it."""
    _call(context, as_json, "reload")


if __name__ == "__main__":
    main()
