#!/usr/bin/env python3
"""An OTLP/gRPC trace collector for bench/tracing.py that counts and discards:
it answers TraceService/Export, counts the spans it received per
service.instance.id (the node id), and keeps nothing else.

Prints `otlp sink serving on 127.0.0.1:PORT` to stderr when ready; on SIGTERM
or SIGINT prints `spans received: {"<node id>": N, ...}` (JSON) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import Counter

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource in request.resource_spans:
            node = next(
                (a.value.string_value for a in resource.resource.attributes if a.key == "service.instance.id"), "?"
            )
            self.spans[node] += sum(len(scope.spans) for scope in resource.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def serve(host: str, port: int) -> None:
    sink = Sink()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"otlp sink serving on {host}:{bound}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)
    print(f"spans received: {json.dumps(dict(sink.spans))}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
