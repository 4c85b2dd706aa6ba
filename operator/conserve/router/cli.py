"""`conserve router`: the conversation-aware OpenAI-compatible front door."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from conserve.router.auth import AuthMode
from conserve.router.policy import USAGE_INTERVAL_S
from conserve.router.scrape import SCRAPE_INTERVAL_S
from conserve.router.validation import DEFAULT_MAX_BODY_BYTES


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "router",
        help="OpenAI-compatible router that pins every turn of a conversation to its decoder",
        description="Serves /v1/chat/completions and /v1/completions. A conversation is named by the "
        "X-Conversation-Id header (else the body's `user`, else metadata.conversation_id). New conversations "
        "become Conversation objects; every turn goes to the decoder the operator pinned, its prompt prefilled where "
        "the pool's P/D decider (spec.prefillDecider) chooses from the servers' live metrics: a prefill server, whose "
        "KV the decoder pulls, or the decoder itself.",
    )
    p.add_argument("--kubeconfig", default=None, help="default: in-cluster, then ~/.kube/config")
    p.add_argument("--namespace", default="default", help="where Conversations and the DecoderPool live")
    p.add_argument("--pool", default="default", help="DecoderPool of new conversations (X-Conserve-Pool overrides)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--mode",
        choices=["conversation", "per-turn"],
        default="conversation",
        help="conversation: pin to the operator's placement; per-turn: least-loaded servers per turn "
        "(the baselines). X-Conserve-Routing overrides per request",
    )
    p.add_argument(
        "--usage-interval",
        type=float,
        default=USAGE_INTERVAL_S,
        help="seconds between usage patches per conversation (one more when it ends)",
    )
    p.add_argument(
        "--usage-endpoint",
        default=None,
        help="stream each turn's usage to the operator here (e.g. http://conserve-operator:9102) instead of "
        "patching spec.usage every --usage-interval; spec.usage is then written at a conversation's end only",
    )
    p.add_argument(
        "--usage-token-file",
        default=os.environ.get("CONSERVE_USAGE_TOKEN_FILE"),
        help="file holding the token the operator expects from routers (required with --usage-endpoint)",
    )
    p.add_argument(
        "--idle-close",
        type=float,
        default=None,
        help="forget a conversation's router state after this long without a turn (seconds; default: its pool's "
        "idle timeout, when the operator ends it)",
    )
    p.add_argument(
        "--placement-timeout",
        type=float,
        default=None,
        help="seconds a turn waits for its conversation's placement at most (default: the pool's "
        "placement.maxQueueWaitSeconds plus a margin, then HTTP 429 with Retry-After; 120 for a pool not seen yet, "
        "and for a re-placement after a decoder is lost)",
    )
    p.add_argument(
        "--no-early-prefill",
        action="store_true",
        help="wait for the placement before the first prefill (default: overlap them)",
    )
    p.add_argument(
        "--scrape-interval",
        type=float,
        default=SCRAPE_INTERVAL_S,
        help="seconds between reads of every server's /metrics (running and waiting requests) for the P/D decider; "
        "0: none",
    )
    p.add_argument(
        "--auth",
        choices=[m.value for m in AuthMode],
        default=AuthMode.NONE.value,
        help="who may call: none (everyone, as one anonymous administrator: development only), api-keys "
        "(Authorization: Bearer keys from --api-keys-dir), header (the identity a gateway that authenticates sets "
        "in --identity-header)",
    )
    p.add_argument(
        "--api-keys-dir",
        type=Path,
        default=None,
        help="a mounted Secret: each file's name is an identity, its text that identity's key (read again every 5 s)",
    )
    p.add_argument(
        "--identity-header",
        default=None,
        help="with --auth header: the header carrying the authenticated identity (e.g. X-Auth-Subject); trusted, so "
        "only the gateway may reach the router",
    )
    p.add_argument(
        "--tenants-file",
        type=Path,
        default=None,
        help="YAML/JSON {admins: [identity], pools: {identity or '*': [pool]}}: who sees the servers, which pools "
        "each identity may use (read again every 5 s)",
    )
    p.add_argument(
        "--backend-api-key-file",
        type=Path,
        default=None,
        help="a mounted Secret file: the key the model servers expect (vLLM --api-key), sent as Authorization: Bearer",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body (bigger: HTTP 413 before it is read)",
    )
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from aiohttp import web

    from conserve.metrics import REGISTRY, ROUTER
    from conserve.router.app import build_app
    from conserve.router.auth import Authenticator, BackendCredentials
    from conserve.router.control import KubeControlPlane
    from conserve.router.policy import Mode
    from conserve.router.service import Router, RouterConfig

    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    router_config = RouterConfig(
        namespace=args.namespace,
        pool=args.pool,
        mode=Mode(args.mode),
        usage_interval_s=args.usage_interval,
        usage_endpoint=args.usage_endpoint,
        usage_token_file=args.usage_token_file,
        idle_close_s=args.idle_close,
        placement_timeout_s=args.placement_timeout,
        early_prefill=not args.no_early_prefill,
        scrape_interval_s=max(args.scrape_interval, 0.0),
    )
    authenticator = Authenticator(
        AuthMode(args.auth),
        api_keys_dir=args.api_keys_dir,
        identity_header=args.identity_header,
        tenants_file=args.tenants_file,
    )
    authenticator.check_files()
    credentials = BackendCredentials(args.backend_api_key_file)
    credentials.headers()  # read once: a missing file stops the router here
    control = KubeControlPlane(namespace=args.namespace, kubeconfig=args.kubeconfig)
    router = Router(router_config, control, ROUTER, credentials=credentials)
    web.run_app(
        build_app(router, REGISTRY, authenticator=authenticator, max_body_bytes=args.max_body_bytes),
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,  # a client gone: its turn (and the request to the server) is cancelled
        print=lambda msg: logging.getLogger(__name__).info("%s", msg),
    )
    return 0
