//! Compiles the .proto files with protox (a Rust protobuf compiler), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["tessera/worker/v1/worker.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
