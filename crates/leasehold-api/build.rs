//! With the feature `grpc`, generates the gRPC code from `proto/leasehold.proto`, with a
//! vendored `protoc` so that a build needs nothing installed but Rust.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/leasehold.proto");
    #[cfg(feature = "grpc")]
    {
        if std::env::var_os("PROTOC").is_none() {
            // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
            unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
        }
        tonic_prost_build::configure()
            .codec_path("crate::codec::StrictCodec")
            .compile_protos(&["proto/leasehold.proto"], &["proto"])?;
    }
    Ok(())
}
