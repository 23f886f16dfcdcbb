"""One ClientApp task on a silo: check the run's app bundle, then run the installed ClientApp.

Started by the silo runner (:mod:`silo_client.app_runner`) either in a fresh interpreter
(``python -m silo_client.app_runner task``) or in a child forked from the pre-warmed worker
(:mod:`silo_client.task_worker`); both call :func:`run_task`. Nothing of the bundle is installed
or imported: a bundle that carries code is refused, audited and answered with ``ERROR_REFUSED``.
"""

from __future__ import annotations

import argparse
import sys

from training_plan import wire


def run_task(args: argparse.Namespace) -> int:
    """One ClientApp task: check the bundle, then run the installed ClientApp (or refuse)."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import (
        pull_task_input,
        push_message,
        push_task_output,
    )

    from secure_agg.flower import shorten_object_pull_backoff
    from silo_client.governance.bundle import BundleRefused, check_bundle

    shorten_object_pull_backoff()  # the message's objects are pulled again after 0.02 s, not 1 s
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    client = RuntimeHttpClient.from_server_address(
        server_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=validate_and_resolve_root_certificates(
            args.root_certificates, args.insecure
        ),
        interceptors=[
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(_token(args)),
        ],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context = None
    status, details, code = SubStatus.FAILED, "ClientApp task failed", 1
    try:
        message, context, _run, fab = pull_task_input(client)
        try:
            check_bundle(fab.content)
        except BundleRefused as exc:
            _audit_bundle_refusal(context, fab.hash_str, str(exc))
            reply = Message(Error(code=wire.ERROR_REFUSED, reason=str(exc)), reply_to=message)
        else:
            from silo_client.client_app import app as installed_app

            reply = installed_app(message=message, context=context)
        push_message(client, reply, context)
        status, details, code = SubStatus.COMPLETED, "", 0
    except Exception as exc:  # the reply could not be produced or pushed
        details = f"{type(exc).__name__}: {exc}"
        try:
            if context is not None and "message" in locals():
                push_message(
                    client,
                    Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="silo runner"),
                        reply_to=message,
                    ),
                    context,
                )
        except Exception:  # best effort: the SuperNode times the task out otherwise
            pass
    finally:
        push_task_output(client=client, context=context, sub_status=status, details=details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    return code


def _token(args: argparse.Namespace) -> str:
    """The task token: given by the worker (forked child) or read from stdin (plain launch)."""
    token = getattr(args, "token", None)
    if token is None and getattr(args, "token_stdin", False):
        token = sys.stdin.readline().strip()
    if not token:
        raise SystemExit("silo runner task: no task token (pass it on stdin with --token-stdin)")
    return token


def _audit_bundle_refusal(context, fab_hash: str, reason: str) -> None:
    from silo_client.errors import SiloError
    from silo_client.governance.audit import audit
    from silo_client.home import SiloHome

    try:
        home = SiloHome.from_node_config(context.node_config)
        audit(
            home.root,
            "bundle-refused",
            flower_run=str(context.run_id),
            fab_hash=fab_hash,
            reason=reason,
        )
    except SiloError:
        pass
