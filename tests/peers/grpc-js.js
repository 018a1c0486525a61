// A gRPC peer on grpc-js (Node.js's http2, that is nghttp2), for tests/peers.rs: the same
// command line and output as grpcio.py, so each test runs against both.
//
//   grpc-js.js client TARGET CALLS_JSON
//   grpc-js.js server
//
// See grpcio.py for what each prints.

"use strict";

const path = require("path");
const grpc = require(path.join(__dirname, "node_modules", "@grpc", "grpc-js"));

const raw = (buffer) => buffer;
const codeName = (code) => Object.keys(grpc.status).find((name) => grpc.status[name] === code);

function metadataObject(metadata) {
  const out = {};
  if (!metadata) return out;
  for (const [key, value] of Object.entries(metadata.getMap())) {
    out[key] = Buffer.isBuffer(value) ? value.toString("hex") : String(value);
  }
  return out;
}

function metadataOf(pairs) {
  const metadata = new grpc.Metadata();
  for (const [key, value] of pairs || []) metadata.add(key, value);
  return metadata;
}

// One call; resolves to its JSON line.
function makeCall(client, call) {
  return new Promise((resolve) => {
    const shape = call.shape || "unary";
    const metadata = metadataOf(call.metadata);
    const options = { deadline: Date.now() + 20000 };
    let initial = {};
    let response = shape === "unary" || shape === "client_stream" ? null : [];
    let stream;
    const finish = (status) =>
      resolve({
        code: codeName(status.code),
        details: status.code === grpc.status.OK ? "" : status.details || "",
        response_hex: response,
        initial,
        trailing: metadataObject(status.metadata),
      });
    const single = (error, value) => {
      if (!error) response = value.toString("hex");
    };
    if (shape === "unary") {
      stream = client.makeUnaryRequest(call.method, raw, raw,
        Buffer.from(call.request_hex, "hex"), metadata, options, single);
    } else if (shape === "client_stream") {
      stream = client.makeClientStreamRequest(call.method, raw, raw, metadata, options, single);
    } else if (shape === "server_stream") {
      stream = client.makeServerStreamRequest(call.method, raw, raw,
        Buffer.from(call.request_hex, "hex"), metadata, options);
    } else {
      stream = client.makeBidiStreamRequest(call.method, raw, raw, metadata, options);
    }
    stream.on("metadata", (received) => {
      initial = metadataObject(received);
    });
    if (Array.isArray(response)) {
      stream.on("data", (message) => response.push(message.toString("hex")));
      stream.on("error", () => {});
    }
    stream.on("status", (status) => {
      // A unary callback and the last data event come before the status event.
      setImmediate(() => finish(status));
    });
    if (shape === "client_stream" || shape === "bidi") {
      for (const request of call.requests_hex) stream.write(Buffer.from(request, "hex"));
      stream.end();
    }
  });
}

async function client(target, calls) {
  const client = new grpc.Client(target, grpc.credentials.createInsecure());
  for (const call of calls) {
    process.stdout.write(JSON.stringify(await makeCall(client, call)) + "\n");
  }
  client.close();
}

function server() {
  let executions = 0;
  const definition = {
    Apply: {
      path: "/idemproxy.testing.v1.Ledger/Apply",
      requestStream: false,
      responseStream: false,
      requestSerialize: raw,
      requestDeserialize: raw,
      responseSerialize: raw,
      responseDeserialize: raw,
    },
  };
  definition.Collect = { ...definition.Apply, path: "/idemproxy.testing.v1.Ledger/Collect", requestStream: true };
  const implementation = {
    // Counts the stream's messages once its input has ended.
    Collect(call, callback) {
      let count = 0;
      call.on("data", () => {
        count += 1;
      });
      call.on("end", () => {
        executions += 1;
        process.stdout.write("collected " + count + "\n");
        callback(null, Buffer.from([0x10, executions]));
      });
    },
    Apply(call, callback) {
      executions += 1;
      process.stdout.write("executed " + call.request.toString("hex") + "\n");
      if (call.request.includes("fail")) {
        const trailer = new grpc.Metadata();
        trailer.add("x-peer-trailer", "kept");
        callback({ code: grpc.status.FAILED_PRECONDITION, details: "the peer refused", metadata: trailer });
        return;
      }
      // ApplyReply { execution = 2 (varint; the tests stay below 128) }
      callback(null, Buffer.from([0x10, executions]));
    },
  };
  const grpcServer = new grpc.Server();
  grpcServer.addService(definition, implementation);
  grpcServer.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (error, port) => {
    if (error) throw error;
    process.stdout.write("listening " + port + "\n");
  });
  // Runs until the test closes our stdin (or kills us).
  process.stdin.resume();
  process.stdin.on("end", () => grpcServer.forceShutdown());
}

if (process.argv[2] === "client") {
  client(process.argv[3], JSON.parse(process.argv[4]));
} else if (process.argv[2] === "server") {
  server();
} else {
  process.stderr.write("usage: grpc-js.js client TARGET CALLS_JSON | grpc-js.js server\n");
  process.exit(2);
}
