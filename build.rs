// Compiles the wire schemas in proto/ into Rust types (prost).
fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto");
    let mut config = prost_build::Config::new();
    config.type_attribute(".", "#[derive(serde::Serialize)]");
    config.compile_protos(&["proto/onair/v1/onair.proto"], &["proto"])
}
