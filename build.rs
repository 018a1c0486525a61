//! Compiles the protos with protox, in process, so a machine with only the Rust toolchain
//! builds the crate: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/google/rpc/status.proto",
        "proto/idemproxy/v1/record.proto",
        "proto/idemproxy/demo/v1/subscriptions.proto",
        "proto/idemproxy/testing/v1/ledger.proto",
        "proto/idemproxy/bench/v1/echo.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".idemproxy.v1.Response.body")
        .bytes(".idemproxy.v1.Header.value")
        .compile_fds(descriptors)?;
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
