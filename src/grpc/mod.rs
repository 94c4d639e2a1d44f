//! The only layer that knows protobuf: thin service impls over the use
//! cases, proto/domain conversion, caller authentication, the single
//! mapping from domain errors to `tonic::Status`, the bound on calls in
//! progress (`limits`), and accepted connections, TLS included (`socket`).

pub mod admin;
pub mod auth;
pub mod convert;
pub mod decode;
pub mod health;
pub mod limits;
pub mod login;
pub mod observe;
pub mod socket;
pub mod status;

/// Generated from `proto/authbroker/v1/*.proto`.
pub mod pb {
    tonic::include_proto!("authbroker.v1");
}

/// Serialized descriptors of our protos (imports included), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("authbroker_descriptor");
