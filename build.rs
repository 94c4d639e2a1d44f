//! Compiles the gRPC contract. protoc comes from `protoc-bin-vendored` because
//! no system protoc can be assumed on a fresh machine.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let include = protoc_bin_vendored::include_path()?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // error_details.proto only feeds reflection; tonic-types has the Rust types.
    let protos = [
        "proto/authbroker/v1/login.proto",
        "proto/authbroker/v1/admin.proto",
        "proto/google/rpc/error_details.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("authbroker_descriptor.bin"))
        .compile_protos(
            &protos.map(PathBuf::from),
            &[PathBuf::from("proto"), include],
        )?;
    // refinery embeds migrations at compile time; a new file must rebuild.
    println!("cargo:rerun-if-changed=migrations");
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
