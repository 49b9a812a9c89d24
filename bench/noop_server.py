#!/usr/bin/env python3
"""Reference server for bench/unary_set.py, bench/transport.py and bench/own_cost.py:
a bare gRPC server answering /fluxkv.v1.KV/Set, Get, MultiSet and MultiGet with
an empty response (the request parsed, nothing done with it) and doing nothing
else, on grpc.aio or on pygrpc-native (--grpc-server) and on the event loop a node
would choose (--event-loop, as the node's FLUX_EVENT_LOOP).

It is the ceiling for unary Python gRPC on that server on this machine: whatever
FluxKV does per Set (validation, the store, revisions) is what separates the two.
Prints `serving on 127.0.0.1:PORT` to stderr when ready; exits on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fluxkv.proto import kv_pb2
from fluxkv.server.grpc_transport import EVENT_LOOPS, SERVERS, VERSIONS, loop_factory

SERVICE = "fluxkv.v1.KV"


async def set_noop(request: kv_pb2.SetRequest, context: grpc.aio.ServicerContext) -> kv_pb2.SetResponse:
    return kv_pb2.SetResponse()


async def get_noop(request: kv_pb2.GetRequest, context: grpc.aio.ServicerContext) -> kv_pb2.GetResponse:
    return kv_pb2.GetResponse()


async def multi_set_noop(request: kv_pb2.MultiSetRequest, context: grpc.aio.ServicerContext) -> kv_pb2.MultiSetResponse:
    return kv_pb2.MultiSetResponse()


async def multi_get_noop(request: kv_pb2.MultiGetRequest, context: grpc.aio.ServicerContext) -> kv_pb2.MultiGetResponse:
    return kv_pb2.MultiGetResponse()


NOOPS = {
    "Set": (set_noop, kv_pb2.SetRequest, kv_pb2.SetResponse),
    "Get": (get_noop, kv_pb2.GetRequest, kv_pb2.GetResponse),
    "MultiSet": (multi_set_noop, kv_pb2.MultiSetRequest, kv_pb2.MultiSetResponse),
    "MultiGet": (multi_get_noop, kv_pb2.MultiGetRequest, kv_pb2.MultiGetResponse),
}


async def serve(host: str, port: int, grpc_server: str) -> None:
    server = SERVERS[grpc_server](options=[("grpc.so_reuseport", 0)])
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            fn, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )
        for name, (fn, request, response) in NOOPS.items()
    }
    # Registered the same way as the node's transport, so both take the same path in grpcio.
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"noop reference server ({VERSIONS[grpc_server]}) serving on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--grpc-server", choices=SERVERS, default="grpcio", help="the gRPC server (default grpcio)")
    parser.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default="auto", help="as FLUX_EVENT_LOOP for a node (default auto)"
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop, args.grpc_server)) as runner:
        runner.run(serve(args.host, args.port, args.grpc_server))


if __name__ == "__main__":
    main()
