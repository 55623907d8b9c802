//! Generated protobuf and gRPC code for `webhooks.v1`, and the encoded file
//! descriptor set that server reflection serves. Nothing else lives here.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// `package webhooks.v1;`
pub mod v1 {
    tonic::include_proto!("webhooks.v1");
}

/// Descriptor set of every file in `proto/`, for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("webhooks_v1_descriptor");
