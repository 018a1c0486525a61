"""An OTLP/HTTP receiver that is not idemproxy's: Python's http.server and the OpenTelemetry
project's own protobuf bindings (the opentelemetry-proto package). It prints
{"listening": PORT} once, then one JSON line per export it decoded:
{"path": "/v1/traces", "content_type": ..., "spans": [names]} or
{"path": "/v1/metrics", "content_type": ..., "metrics": [names]}.
A body it cannot decode is answered 400 and printed as {"path": ..., "error": ...}."""

import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2


def span_names(request):
    return [
        span.name
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def metric_names(request):
    return [
        metric.name
        for resource in request.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
    ]


SIGNALS = {
    "/v1/traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
        "spans",
        span_names,
    ),
    "/v1/metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
        "metrics",
        metric_names,
    ),
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        signal = SIGNALS.get(self.path)
        if signal is None:
            self.answer(404, b"")
            return
        request_type, response_type, field, names = signal
        request = request_type()
        try:
            request.ParseFromString(body)
        except DecodeError as error:
            print(json.dumps({"path": self.path, "error": str(error)}), flush=True)
            self.answer(400, b"")
            return
        line = {
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            field: names(request),
        }
        print(json.dumps(line), flush=True)
        self.answer(200, response_type().SerializeToString())

    def answer(self, status, body):
        self.send_response(status)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(json.dumps({"listening": server.server_address[1]}), flush=True)
server.serve_forever()
