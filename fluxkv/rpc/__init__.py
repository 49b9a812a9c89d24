"""gRPC plumbing shared by the server, forwarding and the client SDK: error kinds to status codes
and back, spans of calls, and the current call's deadline."""
