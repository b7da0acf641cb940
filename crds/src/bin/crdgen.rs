//! Writes the TrainingJob CRD to `crds/kubetrain.io_trainingjobs.yaml` (or to stdout with `-`).

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let yaml = kubetrain_api::crd_yaml();
    match std::env::args().nth(1).as_deref() {
        Some("-") => print!("{yaml}"),
        Some(path) => std::fs::write(path, yaml)?,
        None => {
            let path =
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kubetrain.io_trainingjobs.yaml");
            std::fs::write(&path, yaml)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
