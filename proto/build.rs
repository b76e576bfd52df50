//! Compiles the .proto contract with a protoc shipped inside a crates.io package, so a fresh machine
//! needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=dongbo/v1/dongbo.proto");
    tonic_prost_build::configure().compile_protos(&["dongbo/v1/dongbo.proto"], &["."])?;
    Ok(())
}
