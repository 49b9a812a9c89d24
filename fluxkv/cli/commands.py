"""`fluxkv`: a command-line client for a FluxKV node (fluxkv.v1.KV over gRPC).

Each command makes its calls on one synchronous channel, each with the --timeout
deadline, prints a readable answer on stdout and exits with a status that tells a
negative answer (1) from a usage error or invalid request (2) and from a failed
call (3); see EPILOG.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from fluxkv import arguments
from fluxkv.aof import check as aof_check
from fluxkv.config import ConfigError, Settings, load_etcd_access
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.security import tls, tokens
from fluxkv.security.tls import etcd_tls
from fluxkv.version import __version__

DEFAULT_ADDR = "localhost:50052"
DEFAULT_TIMEOUT_S = 5.0

SUCCESS, NEGATIVE, USAGE, FAILURE = 0, 1, 2, 3

EPILOG = """\
exit status:
  0  success
  1  a negative answer: the key was not found, or an --expect-revision condition failed
  2  a usage error, or a request the server rejects as invalid (INVALID_ARGUMENT)
  3  the server cannot be reached, or the call failed otherwise
"""

INT64_MAX = 2**63 - 1
UINT32_MAX = 2**32 - 1

Command = Callable[[Any, argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> None:
    parser, mset = _parser()
    args = parser.parse_args(argv)
    client_tls = tls.client_tls(args, parser)
    if args.etcd:
        try:
            args.etcd_access = load_etcd_access(os.environ)
        except ConfigError as exc:
            parser.error(str(exc))
    if args.command == "mset":
        if len(args.pairs) % 2:
            mset.error(f"expected KEY VALUE pairs, got an odd number of arguments ({len(args.pairs)})")
        for key in args.pairs[::2]:
            try:
                _key(key)
            except argparse.ArgumentTypeError as exc:
                mset.error(str(exc))
    sys.exit(_run(args, client_tls))


def _run(args: argparse.Namespace, client_tls: tls.TLS | None) -> int:
    if args.offline:
        try:
            return int(args.run(None, args))
        except OSError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return FAILURE
    # The node's answers may be larger than grpcio's default 4 MiB limit for the
    # client (FLUX_MAX_MESSAGE_BYTES is 16 MiB by default): the node bounds them.
    options = [("grpc.max_receive_message_length", -1)]
    args.metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    credentials = None if client_tls is None else client_tls.channel_credentials()
    try:
        status = SUCCESS
        for address in _nodes(args) if args.etcd else [args.addr]:
            args.addr = address  # for the error messages
            with tls.channel(address, credentials, options) as channel:
                kv = kv_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]  # generated code has no annotations
                status = max(status, args.run(kv, args))
        sys.stdout.flush()
        return status
    except _NoNodes as exc:
        print(f"error: {exc}", file=sys.stderr)
        return FAILURE
    except grpc.RpcError as exc:
        return _failed(exc, args)
    except BrokenPipeError:  # stdout closed early, as by `| head`: end quietly, as if killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except KeyboardInterrupt:  # as if killed by SIGINT
        return 128 + 2


class _NoNodes(Exception):
    """etcd names no node to send the command to."""


def _nodes(args: argparse.Namespace) -> list[str]:
    """The nodes a command goes to with --etcd: the owner of its (first) key on
    the ring (a node forwards the other keys of mget and mset to their owners),
    or every node for scan and info (each covers the node it runs on)."""
    from fluxkv.cluster.etcd_client import EtcdClient, EtcdError
    from fluxkv.cluster.hash_ring import HashRing

    access: Settings = args.etcd_access

    async def read() -> list[str]:
        async with EtcdClient(
            args.etcd,
            args.timeout,
            tls=etcd_tls(access),
            username=access.etcd_username,
            password=access.etcd_password,
        ) as etcd:
            pairs, _ = await etcd.get_prefix(args.etcd_prefix)
        return sorted({value for _, value in pairs if value})

    try:
        addresses = asyncio.run(read())
    except (EtcdError, ValueError) as exc:
        raise _NoNodes(f"cannot read the nodes from etcd: {exc}") from None
    if not addresses:
        raise _NoNodes(f"no node is registered under {args.etcd_prefix} in etcd {','.join(args.etcd)}")
    keys = [args.key] if hasattr(args, "key") else getattr(args, "keys", None) or getattr(args, "pairs", [])[::2]
    if not keys:
        return addresses
    return [HashRing(addresses, args.vnodes).owner(keys[0])]


def _failed(exc: grpc.RpcError, args: argparse.Namespace) -> int:
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.ABORTED:  # a failed expect_revision condition
        print(details, file=sys.stderr)
        return NEGATIVE
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        print(f"error: {details}", file=sys.stderr)
        return USAGE
    if code == grpc.StatusCode.UNAVAILABLE:
        # "...: Failed to connect to remote host: Connection refused" -> "Connection refused"
        reason = details.rsplit(": ", 1)[-1].strip(" ]") or "unavailable"
        print(f"error: cannot connect to {args.addr} ({reason})", file=sys.stderr)
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        print(f"error: no answer from {args.addr} within {args.timeout:g} s (--timeout)", file=sys.stderr)
    else:
        print(f"error: {code.name.lower().replace('_', ' ')}: {details}", file=sys.stderr)
    return FAILURE


# -- commands: each returns the exit status -------------------------------------


def _get(kv: Any, args: argparse.Namespace) -> int:
    answer = kv.Get(pb.GetRequest(key=args.key), timeout=args.timeout, metadata=args.metadata)
    if not answer.found:
        print("(not found)", file=sys.stderr)
        return NEGATIVE
    _write(answer.value)
    return SUCCESS


def _set(kv: Any, args: argparse.Namespace) -> int:
    value = sys.stdin.buffer.read() if args.value == "-" else os.fsencode(args.value)
    request = pb.SetRequest(key=args.key, value=value, ttl_ms=args.ttl_ms, expect_revision=args.expect_revision)
    answer = kv.Set(request, timeout=args.timeout, metadata=args.metadata)
    _write(_written(answer.revision, answer.created))
    return SUCCESS


def _delete(kv: Any, args: argparse.Namespace) -> int:
    request = pb.DeleteRequest(key=args.key, expect_revision=args.expect_revision)
    answer = kv.Delete(request, timeout=args.timeout, metadata=args.metadata)
    if not answer.deleted:
        _write("(not found)")
        return NEGATIVE
    _write(f"deleted revision={answer.revision}")
    return SUCCESS


def _mget(kv: Any, args: argparse.Namespace) -> int:
    answer = kv.MultiGet(pb.MultiGetRequest(keys=args.keys), timeout=args.timeout, metadata=args.metadata)
    for key, result in zip(args.keys, answer.results, strict=True):
        _write(_line_key(key), "\t", _line_value(result.value) if result.found else "(not found)")
    return SUCCESS


def _mset(kv: Any, args: argparse.Namespace) -> int:
    keys, values = args.pairs[::2], args.pairs[1::2]
    items = [pb.SetRequest(key=k, value=os.fsencode(v)) for k, v in zip(keys, values, strict=True)]
    answer = kv.MultiSet(pb.MultiSetRequest(items=items), timeout=args.timeout, metadata=args.metadata)
    status = SUCCESS
    for key, result in zip(keys, answer.results, strict=True):
        if result.applied:
            _write(_line_key(key), "\t", _written(result.revision, result.created))
        else:
            _write(_line_key(key), "\t", f"not applied (revision={result.revision})")
            status = NEGATIVE
    return status


def _scan(kv: Any, args: argparse.Namespace) -> int:
    cursor = ""
    while True:
        request = pb.ScanRequest(prefix=args.prefix, cursor=cursor, limit=args.count, include_values=args.values)
        page = kv.Scan(request, timeout=args.timeout, metadata=args.metadata)
        for item in page.items:
            if args.values:
                _write(_line_key(item.key), "\t", _line_value(item.value))
            else:
                _write(_line_key(item.key))
        cursor = page.cursor
        if not cursor:
            return SUCCESS


def _info(kv: Any, args: argparse.Namespace) -> int:
    answer = kv.Info(pb.InfoRequest(), timeout=args.timeout, metadata=args.metadata)
    for name, value in _fields(answer):
        _write(f"{name}: {value}")
    return SUCCESS


def _rewrite_aof(kv: Any, args: argparse.Namespace) -> int:
    # A rewrite takes as long as the data takes to write: no --timeout.
    answer = kv.RewriteAof(pb.RewriteAofRequest(), metadata=args.metadata)
    _write(f"rewrote the append-only file in {answer.seconds:.2f} s: {answer.size_before} -> {answer.size_after} bytes")
    return SUCCESS


def _aof_check(_: None, args: argparse.Namespace) -> int:
    result = aof_check.check(args.file)
    _write(
        f"{args.file}: {result.records} records, epoch {result.epoch or '-'}, up to revision "
        f"{result.last_revision}; {result.good_size} of {result.size} bytes good"
    )
    if result.problem is None:
        return SUCCESS
    if result.torn:
        _write(f"{result.problem}: a node cuts it off when it starts")
    else:
        _write(f"{result.problem}: a node refuses to start; `fluxkv aof-repair {args.file}` cuts the file there")
    return NEGATIVE


def _aof_repair(_: None, args: argparse.Namespace) -> int:
    result, backup = aof_check.repair(args.file)
    if backup is None:
        _write(f"{args.file}: nothing to repair ({result.records} records, up to revision {result.last_revision})")
        return SUCCESS
    _write(
        f"{args.file}: cut at byte offset {result.good_size}, after {result.records} good records (up to revision "
        f"{result.last_revision}); {result.size - result.good_size} bytes removed; the original is {backup}"
    )
    return SUCCESS


def _token_new(_: None, args: argparse.Namespace) -> int:
    secret = tokens.new_secret()
    _write(secret)
    _write("")
    _write(tokens.toml_table(args.name, secret, tokens.ROLES[args.role], args.prefixes).rstrip("\n"))
    return SUCCESS


# -- output -----------------------------------------------------------------------


def _write(*parts: str | bytes) -> None:
    """One line on stdout: text as UTF-8, bytes as they are."""
    sys.stdout.buffer.write(b"".join(p if isinstance(p, bytes) else p.encode() for p in parts) + b"\n")


def _written(revision: int, created: bool) -> str:
    return f"OK revision={revision}" + (" (created)" if created else "")


def _line_value(value: bytes) -> bytes | str:
    """A value as is if it is UTF-8 without line breaks, else Python's repr of the bytes."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return repr(value)
    return repr(value) if "\n" in text or "\r" in text else value


def _line_key(key: str) -> str:
    """A key as is, or its repr if it holds a tab or a line break."""
    return repr(key) if any(c in key for c in "\t\n\r") else key


def _fields(message: Message, prefix: str = "", skip: str = "") -> Iterator[tuple[str, str]]:
    """(dotted name, readable value) for every field of `message`, nested ones
    included; the elements of a repeated message field are named by their `name`."""
    for field in message.DESCRIPTOR.fields:
        if field.name == skip:
            continue
        name, value = prefix + field.name, getattr(message, field.name)
        if field.message_type is None:
            yield name, ", ".join(map(_scalar, value)) if field.is_repeated else _scalar(value)
        elif not field.is_repeated:
            yield from _fields(value, name + ".")
        elif not value:
            yield name, "(none)"
        else:
            for i, element in enumerate(value):
                label = getattr(element, "name", "")
                yield from _fields(element, f"{name}.{label or i}.", "name" if label else "")


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, bytes):
        return repr(value)
    return str(value)


# -- arguments --------------------------------------------------------------------


def _key(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid UTF-8") from None
    return text


def _token_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("a token's name must not be empty")
    return text


def _token_prefix(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("a prefix must not be empty (leave --prefix out for every key)")
    return text


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The parser, and the mset subparser (for its usage errors)."""
    parser = argparse.ArgumentParser(
        prog="fluxkv",
        description="Read and write the keys of a FluxKV node (the fluxkv.v1.KV gRPC API).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fluxkv {__version__}")
    parser.add_argument("--addr", default=DEFAULT_ADDR, metavar="HOST:PORT", help=f"the node (default {DEFAULT_ADDR})")
    tls.add_client_arguments(parser)
    parser.add_argument(
        "--etcd",
        type=arguments.endpoints,
        metavar="HOST:PORT[,...]",
        help="find the nodes in etcd instead of --addr: a key's command goes to its owner, scan and info to every "
        "node; TLS and auth to etcd as the nodes' FLUX_ETCD_CA_FILE, _CERT_FILE, _KEY_FILE, _USERNAME and _PASSWORD",
    )
    parser.add_argument(
        "--etcd-prefix",
        default=Settings.etcd_prefix,
        metavar="PREFIX",
        help=f"the nodes' registration prefix (default {Settings.etcd_prefix})",
    )
    parser.add_argument(
        "--vnodes", type=arguments.integer(1, 4096), default=Settings.ring_vnodes, metavar="N", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--timeout",
        type=arguments.positive,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of each call (default {DEFAULT_TIMEOUT_S:g})",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    int64 = arguments.integer(-INT64_MAX - 1, INT64_MAX)

    def command(name: str, run: Command, summary: str, offline: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, epilog=EPILOG)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        sub.set_defaults(run=run, offline=offline)
        return sub

    get = command("get", _get, "Print the value of KEY.")
    get.add_argument("key", type=_key, metavar="KEY")

    set_ = command("set", _set, "Write VALUE to KEY.")
    set_.add_argument("key", type=_key, metavar="KEY")
    set_.add_argument("value", metavar="VALUE", help="the value; - reads the value bytes from stdin")
    set_.add_argument("--ttl-ms", type=int64, default=0, metavar="N", help="expire after N ms (default: never)")
    set_.add_argument(
        "--expect-revision",
        type=int64,
        metavar="N",
        help="write only if KEY is at revision N (0: only if KEY does not exist)",
    )

    delete = command("del", _delete, "Delete KEY.")
    delete.add_argument("key", type=_key, metavar="KEY")
    delete.add_argument("--expect-revision", type=int64, metavar="N", help="delete only if KEY is at revision N")

    mget = command("mget", _mget, "Print KEY<TAB>VALUE for each KEY, in one call.")
    mget.add_argument("keys", nargs="+", type=_key, metavar="KEY")

    mset = command("mset", _mset, "Write each KEY VALUE pair, in one call (values are taken literally).")
    mset.add_argument("pairs", nargs="+", metavar="KEY VALUE")

    scan = command("scan", _scan, "List the keys, page by page until the scan is complete.")
    scan.add_argument("--prefix", default="", type=_key, metavar="P", help="only keys that start with P")
    scan.add_argument(
        "--count",
        type=arguments.integer(1, UINT32_MAX),
        default=0,
        metavar="N",
        help="keys per page (default: the node's, 100)",
    )
    scan.add_argument("--values", action="store_true", help="print KEY<TAB>VALUE")

    command("info", _info, "Describe the node: identity, revision, size, limits and subsystems.")
    command("rewrite-aof", _rewrite_aof, "Rewrite (compact) the node's append-only file now; waits until done.")
    aof_check = command(
        "aof-check", _aof_check, "Check an append-only file (offline: no node is contacted); 1 if it is damaged.", True
    )
    aof_check.add_argument("file", metavar="FILE")
    aof_repair = command(
        "aof-repair",
        _aof_repair,
        "Cut a damaged append-only file after its last good record, keeping the original as FILE.before-repair "
        "(offline: stop the node first).",
        True,
    )
    aof_repair.add_argument("file", metavar="FILE")

    token = commands.add_parser("token", help="Make tokens for a node's FLUX_AUTH_TOKENS_FILE (offline).")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    summary = (
        "Print a fresh random token, then its [[token]] table for FLUX_AUTH_TOKENS_FILE, which holds only the "
        "token's SHA-256 (offline; docs/security.md)."
    )
    new = token_commands.add_parser("new", help=summary, description=summary)
    new.set_defaults(run=_token_new, offline=True)
    new.add_argument("name", type=_token_name, metavar="NAME", help="shown in the node's logs and metrics")
    new.add_argument("--role", required=True, choices=list(tokens.ROLES), help="what the token may call")
    new.add_argument(
        "--prefix",
        action="append",
        default=[],
        type=_token_prefix,
        dest="prefixes",
        metavar="P",
        help="a key prefix the token may touch (repeatable; default: every key)",
    )
    return parser, mset
