"""A minimal OTLP receiver for the integration tests (started by scripts/otlp-receiver.sh).

    python otlp_receiver.py DIR [--port N] [--no-grpc]

Listens on 127.0.0.1 only (port 0 = any free port, the default) and serves OTLP/HTTP with
protobuf bodies (optionally gzip- or deflate-encoded):

    POST /v1/traces    ExportTraceServiceRequest -> 200, empty ExportTraceServiceResponse
    POST /v1/metrics   accepted (decoded, answered, not recorded)
    POST /v1/logs      accepted (decoded, answered, not recorded)
    GET  /spans        every span received so far, as a JSON array (?trace_id=HEX, ?name=NAME filter)
    GET  /requests     one JSON object per export request (path, headers, span count, status)
    GET  /healthz      "ok"

A body that does not decode gets 400, a JSON body 415 (only OTLP/protobuf is spoken); the
receiver keeps running. Each span is also appended as one JSON line to DIR/spans.jsonl:

    {"trace_id": hex, "span_id": hex, "parent_span_id": hex or "", "name": str,
     "kind": "SPAN_KIND_SERVER"|..., "start_time_unix_nano": int, "end_time_unix_nano": int,
     "attributes": {key: value}, "events": [{"name", "time_unix_nano", "attributes"}],
     "links": [{"trace_id", "span_id", "attributes"}],
     "status": {"code": "STATUS_CODE_UNSET"|"STATUS_CODE_OK"|"STATUS_CODE_ERROR", "message": str},
     "resource": {key: value}, "scope": instrumentation scope name}

Attribute values become JSON strings, ints, floats, bools, lists and objects (kvlists); bytes
become hex strings; a non-finite float becomes its string ("nan", "inf").

When grpcio is importable (and --no-grpc is not given) OTLP/gRPC is served too, on a second port.
Files written in DIR: pid, url (http://127.0.0.1:PORT, written last, atomically: it means ready),
grpc_url (when gRPC is on), spans.jsonl, requests.jsonl.
"""

import argparse
import gzip
import json
import math
import os
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

MAX_BODY = 64 << 20


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        d = v.double_value
        return d if math.isfinite(d) else str(d)
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return attrs(v.kvlist_value.values)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return None


def attrs(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def enum_name(enum, value):
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def span_json(span, resource, scope):
    return {
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "name": span.name,
        "kind": enum_name(Span.SpanKind, span.kind),
        "start_time_unix_nano": span.start_time_unix_nano,
        "end_time_unix_nano": span.end_time_unix_nano,
        "attributes": attrs(span.attributes),
        "events": [
            {"name": e.name, "time_unix_nano": e.time_unix_nano, "attributes": attrs(e.attributes)}
            for e in span.events
        ],
        "links": [
            {"trace_id": l.trace_id.hex(), "span_id": l.span_id.hex(), "attributes": attrs(l.attributes)}
            for l in span.links
        ],
        "status": {
            "code": enum_name(Status.StatusCode, span.status.code),
            "message": span.status.message,
        },
        "resource": resource,
        "scope": scope,
    }


class Store:
    def __init__(self, directory):
        self.lock = threading.Lock()
        self.spans = []
        self.requests = []
        self.spans_file = open(os.path.join(directory, "spans.jsonl"), "a", encoding="utf-8")
        self.requests_file = open(os.path.join(directory, "requests.jsonl"), "a", encoding="utf-8")

    def add_traces(self, req):
        spans = []
        for rs in req.resource_spans:
            resource = attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for span in ss.spans:
                    spans.append(span_json(span, resource, ss.scope.name))
        lines = "".join(json.dumps(s, separators=(",", ":")) + "\n" for s in spans)
        with self.lock:
            self.spans.extend(spans)
            if lines:
                self.spans_file.write(lines)
                self.spans_file.flush()
        return len(spans)

    def add_request(self, record):
        with self.lock:
            self.requests.append(record)
            self.requests_file.write(json.dumps(record, separators=(",", ":")) + "\n")
            self.requests_file.flush()

    def snapshot(self, what):
        with self.lock:
            return list(self.spans if what == "spans" else self.requests)


SIGNALS = {
    "/v1/traces": (ExportTraceServiceRequest, ExportTraceServiceResponse),
    "/v1/metrics": (ExportMetricsServiceRequest, ExportMetricsServiceResponse),
    "/v1/logs": (ExportLogsServiceRequest, ExportLogsServiceResponse),
}


class BadRequest(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def make_handler(store):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as OTLP exporters expect
        server_version = "acc-otlp-receiver"

        def log_message(self, fmt, *args):
            sys.stderr.write("otlp_receiver: %s %s\n" % (self.address_string(), fmt % args))

        def reply(self, status, body=b"", content_type="text/plain; charset=utf-8"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def reply_json(self, value):
            self.reply(200, json.dumps(value).encode(), "application/json")

        def read_body(self):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks, total = [], 0
                while True:
                    size_line = self.rfile.readline(1024)
                    try:
                        size = int(size_line.split(b";")[0].strip(), 16)
                    except ValueError:
                        self.close_connection = True
                        raise BadRequest(400, "bad chunk size line")
                    if size == 0:
                        while self.rfile.readline(8192) not in (b"\r\n", b"\n", b""):
                            pass
                        break
                    total += size
                    if total > MAX_BODY:
                        self.close_connection = True
                        raise BadRequest(413, "body too large")
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline(8)
                return b"".join(chunks)
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                self.close_connection = True
                raise BadRequest(400, "bad Content-Length")
            if length < 0 or length > MAX_BODY:
                self.close_connection = True
                raise BadRequest(413, "body too large")
            return self.rfile.read(length)

        def decode_body(self, body):
            encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
            try:
                if encoding == "gzip":
                    return gzip.decompress(body)
                if encoding == "deflate":
                    return zlib.decompress(body)
            except (OSError, EOFError, zlib.error) as e:
                raise BadRequest(400, f"bad {encoding} body: {e}")
            if encoding not in ("", "identity"):
                raise BadRequest(415, f"unsupported Content-Encoding {encoding}")
            return body

        def do_POST(self):
            path = urlsplit(self.path).path
            record = {
                "path": path,
                "content_type": self.headers.get("Content-Type", ""),
                "content_encoding": self.headers.get("Content-Encoding", ""),
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "spans": 0,
                "status": 200,
                "error": "",
            }
            try:
                body = self.read_body()
                if path not in SIGNALS:
                    raise BadRequest(404, f"no such endpoint {path}")
                ctype = record["content_type"].split(";")[0].strip().lower()
                if ctype == "application/json":
                    raise BadRequest(415, "only OTLP/protobuf is supported, not OTLP/JSON")
                if ctype not in ("", "application/x-protobuf", "application/protobuf"):
                    raise BadRequest(415, f"unsupported Content-Type {ctype}")
                req_type, resp_type = SIGNALS[path]
                data = self.decode_body(body)
                try:
                    req = req_type.FromString(data)
                except (DecodeError, RuntimeError, ValueError) as e:
                    raise BadRequest(400, f"cannot decode {req_type.__name__}: {e}")
                if path == "/v1/traces":
                    record["spans"] = store.add_traces(req)
                store.add_request(record)
                self.reply(200, resp_type().SerializeToString(), "application/x-protobuf")
            except BadRequest as e:
                record["status"], record["error"] = e.status, str(e)
                store.add_request(record)
                self.reply(e.status, (str(e) + "\n").encode())
            except Exception as e:  # never let one request take the receiver down
                record["status"], record["error"] = 500, repr(e)
                store.add_request(record)
                self.reply(500, (repr(e) + "\n").encode())

        def do_GET(self):
            url = urlsplit(self.path)
            if url.path == "/healthz":
                self.reply(200, b"ok\n")
            elif url.path == "/spans":
                q = parse_qs(url.query)
                spans = store.snapshot("spans")
                for key in ("trace_id", "name"):
                    if key in q:
                        spans = [s for s in spans if s[key] in q[key]]
                self.reply_json(spans)
            elif url.path == "/requests":
                self.reply_json(store.snapshot("requests"))
            else:
                self.reply(404, b"not found\n")

        do_HEAD = do_GET

    return Handler


def start_grpc(store):
    import grpc
    from concurrent import futures

    def trace_export(request, context):
        n = store.add_traces(request)
        store.add_request({
            "path": "grpc:/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            "content_type": "application/grpc", "content_encoding": "",
            "headers": {k: v for k, v in context.invocation_metadata() if isinstance(v, str)},
            "spans": n, "status": 200, "error": "",
        })
        return ExportTraceServiceResponse()

    def handler(service, req_type, resp_type, fn):
        return grpc.method_handlers_generic_handler(service, {
            "Export": grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=req_type.FromString,
                response_serializer=resp_type.SerializeToString),
        })

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((
        handler("opentelemetry.proto.collector.trace.v1.TraceService",
                ExportTraceServiceRequest, ExportTraceServiceResponse, trace_export),
        handler("opentelemetry.proto.collector.metrics.v1.MetricsService",
                ExportMetricsServiceRequest, ExportMetricsServiceResponse,
                lambda req, ctx: ExportMetricsServiceResponse()),
        handler("opentelemetry.proto.collector.logs.v1.LogsService",
                ExportLogsServiceRequest, ExportLogsServiceResponse,
                lambda req, ctx: ExportLogsServiceResponse()),
    ))
    port = server.add_insecure_port("127.0.0.1:0")
    if not port:
        raise RuntimeError("could not bind a gRPC port on 127.0.0.1")
    server.start()
    return server, port


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser(description="minimal OTLP receiver for tests")
    ap.add_argument("dir")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--no-grpc", action="store_true")
    args = ap.parse_args()

    os.makedirs(args.dir, exist_ok=True)
    write_atomic(os.path.join(args.dir, "pid"), f"{os.getpid()}\n")
    store = Store(args.dir)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(store))
    httpd.daemon_threads = True

    grpc_server = None
    if not args.no_grpc:
        try:
            grpc_server, grpc_port = start_grpc(store)
            write_atomic(os.path.join(args.dir, "grpc_url"), f"http://127.0.0.1:{grpc_port}\n")
            print(f"otlp_receiver: OTLP/gRPC on 127.0.0.1:{grpc_port}", file=sys.stderr)
        except ImportError:
            print("otlp_receiver: grpcio is not installed; OTLP/HTTP only", file=sys.stderr)
        except Exception as e:
            print(f"otlp_receiver: gRPC disabled: {e!r}", file=sys.stderr)

    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    write_atomic(os.path.join(args.dir, "url"), url + "\n")
    print(f"otlp_receiver: OTLP/HTTP on {url} (traces: {url}/v1/traces)", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if grpc_server is not None:
            grpc_server.stop(0)


if __name__ == "__main__":
    main()
