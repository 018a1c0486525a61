//! Compiles the echo service's proto with protox, in process (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/idemproxy/bench/v1/echo.proto";
    let descriptors = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed={file}");
    Ok(())
}
