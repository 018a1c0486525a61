"""A gRPC peer on grpcio (gRPC's C core), for tests/peers.rs: a client or a server that is not
tonic, so idemproxy is checked against another implementation of the gRPC HTTP/2 protocol.

Messages are raw protobuf bytes: the Rust test encodes and decodes them.

  peer.py client TARGET CALLS_JSON
      Makes each call of CALLS_JSON in turn on one channel, a list of
      {"method": "/pkg.Service/Method", "request_hex": "..", "metadata": [[k, v], ..],
       "shape": "unary" | "server_stream" | "client_stream" | "bidi"}
      (a client or bidi stream sends "requests_hex", a list), and prints one JSON line per
      call: code, details, response_hex (a list for a server or bidi stream), initial and
      trailing metadata (binary values hex-encoded).

  peer.py server
      Serves idemproxy.testing.v1.Ledger/Apply on a free loopback port, prints
      "listening PORT", then "executed REQUEST_HEX" for every call it executes. The reply is
      an ApplyReply whose execution field counts calls; a request whose bytes hold
      b"fail" is answered FAILED_PRECONDITION, with a trailer, after executing. Collect (a
      client stream) prints "collected N" once its input ends, N its messages, and answers
      an ApplyReply the same way.
"""

import json
import sys
import threading
from concurrent import futures

import grpc


def _metadata(pairs):
    out = {}
    for key, value in pairs or ():
        out[key] = value.hex() if isinstance(value, bytes) else value
    return out


def _line(outcome, response):
    """What a finished call (or its RpcError, which is a call too) printed as."""
    return {
        "code": outcome.code().name,
        "details": outcome.details() or "",
        "response_hex": response,
        "initial": _metadata(outcome.initial_metadata()),
        "trailing": _metadata(outcome.trailing_metadata()),
    }


def client(target, calls):
    with grpc.insecure_channel(target) as channel:
        for call in calls:
            metadata = [tuple(pair) for pair in call.get("metadata", [])]
            shape = call.get("shape", "unary")
            try:
                if shape == "unary":
                    stub = channel.unary_unary(call["method"])
                    request = bytes.fromhex(call["request_hex"])
                    response, outcome = stub.with_call(request, metadata=metadata, timeout=20)
                    response = response.hex()
                elif shape == "client_stream":
                    stub = channel.stream_unary(call["method"])
                    requests = iter([bytes.fromhex(r) for r in call["requests_hex"]])
                    response, outcome = stub.with_call(requests, metadata=metadata, timeout=20)
                    response = response.hex()
                else:
                    if shape == "server_stream":
                        stub = channel.unary_stream(call["method"])
                        outcome = stub(bytes.fromhex(call["request_hex"]), metadata=metadata, timeout=20)
                    else:
                        stub = channel.stream_stream(call["method"])
                        requests = iter([bytes.fromhex(r) for r in call["requests_hex"]])
                        outcome = stub(requests, metadata=metadata, timeout=20)
                    response = [message.hex() for message in outcome]
                line = _line(outcome, response)
            except grpc.RpcError as error:
                line = _line(error, None)
            print(json.dumps(line), flush=True)


def _varint(value):
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def server():
    lock = threading.Lock()
    executions = [0]

    def apply(request, context):
        with lock:
            executions[0] += 1
            execution = executions[0]
            print("executed " + request.hex(), flush=True)
        if b"fail" in request:
            context.set_trailing_metadata((("x-peer-trailer", "kept"),))
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the peer refused")
        # ApplyReply { execution = 2 (varint) }
        return b"\x10" + _varint(execution)

    def collect(requests, context):
        # Counts the stream's messages once its input has ended; an input that never ends
        # (an empty stream whose end the server never sees) never answers.
        count = sum(1 for _ in requests)
        with lock:
            executions[0] += 1
            execution = executions[0]
            print("collected %d" % count, flush=True)
        return b"\x10" + _varint(execution)

    handler = grpc.method_handlers_generic_handler(
        "idemproxy.testing.v1.Ledger",
        {
            "Apply": grpc.unary_unary_rpc_method_handler(apply),
            "Collect": grpc.stream_unary_rpc_method_handler(collect),
        },
    )
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    grpc_server.add_generic_rpc_handlers((handler,))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    print("listening %d" % port, flush=True)
    # Runs until the test closes our stdin (or kills us).
    sys.stdin.read()
    grpc_server.stop(0)


if __name__ == "__main__":
    if sys.argv[1] == "client":
        client(sys.argv[2], json.loads(sys.argv[3]))
    elif sys.argv[1] == "server":
        server()
    else:
        sys.exit("usage: peer.py client TARGET CALLS_JSON | peer.py server")
