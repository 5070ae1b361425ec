//! The onestop v1 contract: the Rust code generated from `proto/onestop/**.proto`, one module
//! per protobuf package, and the encoded file descriptor set that servers offer through gRPC
//! reflection. The `.proto` files are the source of truth; see `proto/buf.yaml` for the lint and
//! breaking-change rules they follow.

#![allow(missing_docs, unused_qualifications, clippy::all)]

/// Shared types used by every area (`onestop.type.v1`; the module mirrors the package so that
/// generated code finds it).
pub mod r#type {
    /// `onestop.type.v1`.
    pub mod v1 {
        tonic::include_proto!("onestop.r#type.v1");
    }
}

/// The e-forms area.
pub mod forms {
    /// `onestop.forms.v1`.
    pub mod v1 {
        tonic::include_proto!("onestop.forms.v1");
    }
}

/// The encoded `FileDescriptorSet` of the whole contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("onestop_descriptor");
