//! Flotilla's gRPC API (package `flotilla.v1`): generated types and services, and conversions
//! between wire types and `flotilla-core` domain types (one module per type family).

pub mod convert;
pub mod fuzzing;
pub mod grpc;
pub mod http;
pub mod pki;
pub mod tls;

/// Generated code for package `flotilla.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("flotilla.v1");
}

/// The encoded `FileDescriptorSet` of every Flotilla proto, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/flotilla_descriptor.bin"));
