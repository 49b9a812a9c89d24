"""A Flux-KV client: run with the generated kv_pb2 modules on sys.path and the
node's address as argument; prints what each call answered."""

import sys

import grpc
import kv_pb2
import kv_pb2_grpc

with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = kv_pb2_grpc.KVServiceStub(channel)
    print("set", stub.Set(kv_pb2.SetRequest(key="go:key", value="from a Flux-KV client")).success)
    got = stub.Get(kv_pb2.GetRequest(key="go:key"))
    print("get", got.found, got.value)
    print("del", stub.Del(kv_pb2.DelRequest(key="go:key")).success)
    got = stub.Get(kv_pb2.GetRequest(key="go:key"))
    print("get", got.found, repr(got.value))
