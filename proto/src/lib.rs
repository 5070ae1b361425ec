//! The onestop v1 contract: the Rust code generated from `proto/onestop/**.proto`, one module
//! per protobuf package (`onestop.forms.v1` is [`forms::v1`]), and the encoded file descriptor
//! set that servers offer through gRPC reflection. The `.proto` files are the source of truth;
//! see `proto/buf.yaml` for the lint and breaking-change rules they follow. A new package is
//! picked up by the build without a list to keep.

#![allow(missing_docs, unused_qualifications, clippy::all)]

/// A generated gRPC server whose message size limits can be set, so that the platform's
/// server applies its configured limits to every service in one place.
pub trait MessageLimits {
    /// The server, refusing to decode or encode messages over `max_bytes`.
    fn with_message_limits(self, max_bytes: usize) -> Self;
}

/// Implements [`MessageLimits`] for generated servers (`message_limits!(echo_server::EchoServer)`);
/// the contract's own servers have it already, a test's own protobuf services call this.
#[macro_export]
macro_rules! message_limits {
    ($($($segment:ident)::+),* $(,)?) => {
        $(
            impl<T> $crate::MessageLimits for $($segment)::+<T> {
                fn with_message_limits(self, max_bytes: usize) -> Self {
                    self.max_decoding_message_size(max_bytes)
                        .max_encoding_message_size(max_bytes)
                }
            }
        )*
    };
}

include!(concat!(env!("OUT_DIR"), "/packages.rs"));

/// The encoded `FileDescriptorSet` of the whole contract, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("onestop_descriptor");
