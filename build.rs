//! Compiles the protos with protox, in process, so a machine with only the Rust toolchain
//! builds the crate: no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/google/rpc/status.proto",
        "proto/idemproxy/v1/record.proto",
        "proto/idemproxy/v1/annotations.proto",
        "proto/idemproxy/v1/admin.proto",
        "proto/idemproxy/demo/v1/subscriptions.proto",
        "proto/idemproxy/testing/v1/ledger.proto",
        "proto/idemproxy/example/v1/payments.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .bytes(".idemproxy.v1.Response.body")
        .bytes(".idemproxy.v1.Header.value")
        .compile_fds(descriptors)?;
    // Descriptor sets with their custom options kept (protox's encoder keeps them; prost's
    // types would drop them): the demo and the tests load policy from the example's and the
    // demo's, the tests from the test upstream's too, and the admin port serves the admin
    // API's by reflection.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    for (proto, set) in [
        (
            "idemproxy/example/v1/payments.proto",
            "example_descriptors.bin",
        ),
        (
            "idemproxy/demo/v1/subscriptions.proto",
            "demo_descriptors.bin",
        ),
        ("idemproxy/v1/admin.proto", "admin_descriptors.bin"),
        (
            "idemproxy/testing/v1/ledger.proto",
            "testing_descriptors.bin",
        ),
    ] {
        let encoded = protox::Compiler::new(["proto"])?
            .include_imports(true)
            .open_file(proto)?
            .encode_file_descriptor_set();
        std::fs::write(out.join(set), encoded)?;
    }
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
