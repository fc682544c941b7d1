// Compiles the wire schemas in proto/ into Rust types (prost). With the `torch` feature,
// also gives the binaries an rpath to libtorch (torch-sys puts none on them) and, on a CUDA
// libtorch, keeps libtorch_cuda linked (--as-needed would drop it and CUDA would never be
// available at run time).
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_some() {
        if let Some(dir) = std::env::var_os("LIBTORCH") {
            let lib = std::path::PathBuf::from(dir).join("lib");
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
            if lib.join("libtorch_cuda.so").exists() {
                println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
                println!("cargo:rustc-link-arg=-ltorch_cuda");
                println!("cargo:rustc-link-arg=-Wl,--as-needed");
            }
        }
    }
    let mut config = prost_build::Config::new();
    config.type_attribute(".", "#[derive(serde::Serialize)]");
    // Maps in key order: a replayed record must encode to the same bytes.
    config.btree_map(["."]);
    config.compile_protos(&["proto/onair/v1/onair.proto"], &["proto"])
}
