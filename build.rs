//! Compiles `proto/webhooks/v1/*.proto` into Rust with the protoc shipped by
//! `protoc-bin-vendored`, so no protoc has to be installed on the machine, and
//! writes the encoded descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/webhooks/v1/resources.proto",
        "proto/webhooks/v1/admin.proto",
        "proto/webhooks/v1/ingest.proto",
    ];
    let well_known = protoc_bin_vendored::include_path()?;
    let includes = [PathBuf::from("proto"), well_known];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);

    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("webhooks_v1_descriptor.bin"))
        .compile_with_config(config, &protos.map(PathBuf::from), &includes)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
