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

    std::fs::write(out_dir.join("packages.rs"), packages(&descriptors))?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Maps encode in key order, so that equal requests have equal fingerprints.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

/// The module tree of the generated code (`onestop.forms.v1` becomes `forms::v1`) and, for every
/// service's server, its `MessageLimits`.
fn packages(descriptors: &prost_types::FileDescriptorSet) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write;

    // Package → its services.
    let mut packages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &descriptors.file {
        let package = file.package().to_owned();
        let services = packages.entry(package).or_default();
        services.extend(file.service.iter().map(|s| s.name().to_owned()));
    }
    let mut out = String::new();
    for (package, services) in &packages {
        let Some(path) = package.strip_prefix("onestop.") else {
            continue;
        };
        let segments: Vec<String> = path.split('.').map(module_name).collect();
        for (depth, segment) in segments.iter().enumerate() {
            let name = package
                .split('.')
                .take(depth + 2)
                .collect::<Vec<_>>()
                .join(".");
            let _ = writeln!(out, "/// `{name}`.\npub mod {segment} {{");
        }
        let _ = writeln!(out, "tonic::include_proto!(\"{}\");", {
            let mut generated = vec!["onestop".to_owned()];
            generated.extend(segments.iter().cloned());
            generated.join(".")
        });
        for service in services {
            let module = format!("{}_server", snake(service));
            let _ = writeln!(out, "crate::message_limits!({module}::{service}Server);");
        }
        for _ in &segments {
            out.push_str("}\n");
        }
    }
    out
}

/// A package segment as a Rust module name (`type` is a keyword).
fn module_name(segment: &str) -> String {
    match segment {
        "type" => "r#type".to_owned(),
        other => other.to_owned(),
    }
}

/// `FormsService` → `forms_service`, as prost names a service's modules.
fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
