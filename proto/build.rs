//! Generates the Rust code of the contract from the `.proto` files with the pure-Rust `protox`
//! compiler, so that no system `protoc` is needed, and keeps the file descriptor set for server
//! reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "onestop/type/v1/identifiers.proto",
        "onestop/type/v1/localized_text.proto",
        "onestop/forms/v1/form.proto",
        "onestop/forms/v1/forms_service.proto",
    ];
    println!("cargo:rerun-if-changed=onestop");

    let descriptors = protox::compile(files, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("onestop_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
