//! Compiles the .proto files with protox (a Rust protobuf compiler), so building needs no `protoc`.
//! The encoded descriptor set is also written out for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["tessera/worker/v1/worker.proto", "tessera/v1/tessera.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("tessera_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // Malformed client messages are INVALID_ARGUMENT, not prost's INTERNAL (see src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::CheckedCodec")
        .compile_fds(descriptors)?;
    Ok(())
}
