fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A vendored protoc, handed to prost directly (no PROTOC env var: setting env vars is
    // `unsafe` in edition 2024 and the workspace forbids unsafe code).
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Tensor payloads decode as `Bytes` slices of the receive buffer instead of copies.
        .bytes(".kubetrain.v1")
        .compile_with_config(
            config,
            &[
                "proto/kubetrain/v1/ps.proto",
                "proto/kubetrain/v1/progress.proto",
                "proto/kubetrain/v1/pipeline.proto",
            ],
            &["proto"],
        )?;
    Ok(())
}
