//! Generates the Rust code of the contract from the `.proto` files with the pure-Rust `protox`
//! compiler, so that no system `protoc` is needed, and keeps the file descriptor set for server
//! reflection.

use std::path::{Path, PathBuf};

/// Every `.proto` file under `dir`, as paths relative to the crate, in a stable order.
fn proto_files(dir: &Path, found: &mut Vec<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            proto_files(&path, found)?;
        } else if path.extension().is_some_and(|ext| ext == "proto") {
            found.push(path.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Every file of the contract: a new package is picked up without a list to keep.
    let mut files = Vec::new();
    proto_files(Path::new("onestop"), &mut files)?;
    files.sort();
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
