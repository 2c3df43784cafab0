//! Compiles `proto/flotilla/v1/*.proto` with protox (pure Rust), so no system `protoc` is needed.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/flotilla/v1/kv.proto",
        "proto/flotilla/v1/raft.proto",
        "proto/flotilla/v1/admin.proto",
        "proto/flotilla/v1/discovery.proto",
        "proto/flotilla/v1/campaign.proto",
        "proto/flotilla/v1/fleet.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection (grpcurl works without .proto files).
    std::fs::write(out.join("flotilla_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentService.Connect` would clash with the generated `Client::connect` constructor;
        // clients are built from a `Channel` instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
