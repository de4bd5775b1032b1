"""``deepaudit submit -- audit ...``, ``deepaudit status JOB`` and ``deepaudit logs JOB``:
run deepaudit on a Ray cluster as a Ray Job (through the head's dashboard)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console

err = Console(stderr=True)

AddressOption = Annotated[
    Optional[str],
    typer.Option(help="The head node's dashboard, http://HEAD:8265 (default: "
                 "$RAY_API_SERVER_ADDRESS, an http $RAY_ADDRESS, or http://127.0.0.1:8265)."),
]


def _fail(exc: Exception, code: int = 2) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}")
    return typer.Exit(code)


def submit_command(
    ctx: typer.Context,
    address: AddressOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends; exit "
                           "0 if it succeeded, 1 if not.")
    ] = False,
    ship_code: Annotated[
        bool, typer.Option("--ship-code", help="Upload this machine's deepaudit source with "
                           "the job (py_modules), shadowing the cluster's install. Default: "
                           "run the deepaudit installed on the cluster.")
    ] = False,
    working_dir: Annotated[
        Optional[str], typer.Option(help="A local folder uploaded as the job's working "
                                    "directory (relative paths in the command resolve there).")
    ] = None,
    env: Annotated[
        Optional[list[str]], typer.Option(help="Pass this environment variable's value to "
                                          "the job (repeatable; NAME only, never NAME=VALUE; "
                                          "values are never printed).")
    ] = None,
    submission_id: Annotated[
        Optional[str], typer.Option(help="Job id to use (default: Ray picks one).")
    ] = None,
) -> None:
    """Submit a deepaudit command as a Ray Job: deepaudit submit [OPTIONS] -- audit ARGS.

    An 'audit' joins the cluster (--address auto is added). Prints the job id."""
    from deepaudit.infra.cluster import JobSpec, follow as follow_job, submit

    try:
        spec = JobSpec(args=tuple(ctx.args), ship_code=ship_code, working_dir=working_dir,
                       env_names=tuple(env or ()), submission_id=submission_id)
        job_id = submit(spec, address)
    except (ValueError, ConnectionError) as exc:
        raise _fail(exc) from None
    except RuntimeError as exc:  # the job server refused it
        raise _fail(exc) from None
    sys.stdout.write(job_id + "\n")
    sys.stdout.flush()
    if follow:
        status = follow_job(job_id, lambda s: (sys.stdout.write(s), sys.stdout.flush()), address)
        err.print(f"job {job_id}: {status}")
        raise typer.Exit(0 if status == "SUCCEEDED" else 1)


def job_status_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID",
                                          help="The id 'deepaudit submit' printed.")],
    address: AddressOption = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Show a submitted job's status (exit 0 succeeded or running, 1 failed or stopped)."""
    from deepaudit.infra.cluster import job_info

    try:
        info = job_info(job_id, address)
    except (ConnectionError, RuntimeError) as exc:
        raise _fail(exc) from None
    if json_out:
        sys.stdout.write(json.dumps(info) + "\n")
    else:
        for k, v in info.items():
            sys.stdout.write(f"{k:17} {'' if v is None else v}\n")
    raise typer.Exit(1 if info["status"] in ("FAILED", "STOPPED") else 0)


def job_logs_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB_ID",
                                          help="The id 'deepaudit submit' printed.")],
    address: AddressOption = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
) -> None:
    """Print a submitted job's logs."""
    from deepaudit.infra.cluster import follow as follow_job, job_logs

    try:
        if follow:
            status = follow_job(job_id, lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                                address)
            err.print(f"job {job_id}: {status}")
        else:
            sys.stdout.write(job_logs(job_id, address))
    except (ConnectionError, RuntimeError) as exc:
        raise _fail(exc) from None
